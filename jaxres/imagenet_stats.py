"""ImageNet's per-channel pixel mean and std (RGB, pixels scaled to [0, 1]): what torchvision's
published weights expect (`torchvision.transforms._presets.ImageClassification`) and what the
ImageNet input pipeline subtracts and divides by. One home for both users: `jaxres.data.sources`
(the dataset's spec) and `jaxres.weights.descriptors` (the weights' preprocessing)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
