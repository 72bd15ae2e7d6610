"""Every field a training run reads, with its default: the config that each recipe of
`jaxres.configs` starts from and overrides (as the Flax examples' `configs/default.py`)."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with defaults; recipes override some of them."""
    c = ml_collections.ConfigDict()
    c.model = "cifar_resnet20"  # a registry name (jaxres models)
    c.model_overrides = ml_collections.ConfigDict()  # model dataclass fields, e.g. {"dropout": 0.5}
    c.dataset = "cifar10"  # see jaxres.data.DATASETS
    c.data_dir = ""  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.train_split = ""  # "" = the dataset's default
    c.eval_split = ""
    c.augment = ""  # "" = the dataset's paper augmentation ("cifar", "imagenet", "mnist", "none")
    c.batch_size = 128  # global batch (all hosts)
    c.eval_batch_size = 500
    c.num_steps = 64000
    c.seed = 0
    # A new run that continues another's state: a workdir (its latest checkpoint), its
    # checkpoints/ or best/ directory, or one step directory. Read only while this run's own
    # workdir holds no checkpoint (e.g. to go on with a lower learning rate after a NaN).
    c.init_from = ""
    # Optimizer: SGD with momentum and L2 weight decay (He et al. 2015).
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 1e-4
    c.weight_decay_exclude_bn_and_bias = False
    c.label_smoothing = 0.0
    # Precision and scale-out (jaxres.train.precision, jaxres.train.drivers).
    c.dtype = "float32"  # compute dtype: "float32" | "bfloat16" | "float16" (params stay float32)
    c.loss_scale_initial = 2.0**15  # float16 only: dynamic loss scaling starts here
    c.parallel = "auto"  # "auto" (single on one device, else sharded) | "single" | "pmap" | "sharded"
    c.schedule = "piecewise"  # "piecewise" | "step" | "cosine" | "constant"
    c.lr_boundaries = ml_collections.ConfigDict({"32000": 0.1, "48000": 0.1})  # iteration -> factor
    c.decay_every_epochs = 30.0  # schedule="step"
    c.decay_factor = 0.1
    c.warmup_steps = 0  # a linear warm-up over the first updates (any schedule; cosine's starts from 0)
    c.optimizer = "sgd"  # "sgd" | "lars" (per-kernel trust ratio: every layer steps the same fraction of its norm)
    c.trust_coefficient = 0.001  # lars only: a kernel's step before the learning rate, as a fraction of its norm
    # Gradient propagation measured during training (jaxres.analysis.monitor), on a fixed probe
    # batch of the training split, at step 0, every `analysis_every_steps`, at each step of
    # `analysis_steps` and at the end (jaxres.records); on when either of the two is set.
    c.analysis_every_steps = 0  # 0 = off
    c.analysis_steps = ()  # extra steps to measure at, e.g. (1, 2, 4, 8, 16, 32, 64): early dynamics
    c.analysis_batch_size = 32  # probe examples (the first of a seed-fixed permutation of the train split)
    c.analysis_bn = "batch"  # BatchNorm policy: "batch" (as trained), "eval" (running statistics), "eval,batch"
    c.analysis_unit_jacobians = 0  # per-unit ||J||_F^2 and sigma_max on this many evenly spaced units
    c.analysis_sharpness = 0  # top Hessian eigenvalue (Lanczos, <= this many HVPs) at each measurement; 0 = off
    # At every evaluation, also the net in eval mode on this many training examples (metrics split
    # "train_eval"): the first N of a permutation of the training split drawn from a fixed seed
    # (jaxres.train.run.TRAIN_EVAL_SEED), the same images for every run and seed. 0 = off.
    c.train_eval_examples = 0
    # The evaluations of training score this many examples of the eval split, the same sample of a
    # fixed-seed permutation each time (a quick check's cheaper test error); 0 = the whole split.
    # `jaxres eval` always scores the whole split.
    c.eval_examples = 0
    # Bookkeeping.
    c.log_every_steps = 100
    c.eval_every_steps = 2000  # also at the end; 0 = only at the end
    c.checkpoint_every_steps = 1000  # also at the end and on SIGTERM
    c.keep_checkpoints = 3  # the latest; the best evaluated one is kept besides them
    c.num_data_threads = 2
    c.device_prefetch = 2  # training batches on the devices ahead of the step, this one included; 1 = none
    c.progress_bar = True
    return c
