"""Copies each experiment's findings (experiments/results/*/README.md, results.md) and figures
into the site under results/<name>/, and writes results/index.md linking them, so that findings
stay next to their figures in the repository and still appear in the docs with working images."""

from pathlib import Path

import mkdocs_gen_files

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"

index = ["# Results and findings", "",
         "Each experiment's findings, next to its figures, as committed in `experiments/results/`; "
         "every figure regenerates from the files there with the command its page states.", ""]
for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
    pages = []
    for path in sorted(folder.iterdir()):
        if path.suffix in (".md", ".png"):
            with mkdocs_gen_files.open(f"results/{folder.name}/{path.name}", "wb") as out:
                out.write(path.read_bytes())
            if path.suffix == ".md":
                pages.append(path.name)
    links = ", ".join(f"[{'findings' if name == 'README.md' else 'tables'}]({folder.name}/{name})"
                      for name in sorted(pages, key=lambda n: n != "README.md"))
    index.append(f"- `{folder.name}`: {links or 'figures only'}")
with mkdocs_gen_files.open("results/index.md", "w") as out:
    out.write("\n".join(index) + "\n")
