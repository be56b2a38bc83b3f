"""Export a training checkpoint to a ``save_pretrained`` folder with a model card.

The folder holds ``config.json`` (the ALGNet constructor kwargs), ``model.safetensors`` and
``README.md``: a Hugging Face model card stating the preset, the training data, the config, the number
of steps and an evaluation table. Rows of that table come from the run's validation and from
``--eval NAME=FILE.json`` files: either the report of ``algnet eval ... --json FILE.json`` (its mean
blurry/restored PSNR and SSIM become the row NAME) or a list of rows
``{benchmark, images, psnr_blurry, ssim_blurry, psnr, ssim[, command]}``.

    python -m train.export runs/synthetic_motion_s/best.pt OUT_DIR --eval "Levin x Kodak24=levin.json"
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from algnet_core import ALGNet

from .engine import load_checkpoint

CARD_TEMPLATE = """---
library_name: algnet
license: mit
pipeline_tag: image-to-image
tags:
- image-deblurring
- image-restoration
- mamba
- algnet
---

# {name}

ALGNet ({preset} preset, {params:,} parameters) for {task}, trained with the `train/` pipeline of the
[algnet](https://github.com/algnet/algnet) package (paper: "Learning Enriched Features via Selective State
Spaces Model for Efficient Image Deblurring", https://doi.org/10.1145/3664647.3681009).

## Training data

{training_data}

## Training

- steps: {steps} (of {total_steps} configured), global batch {batch}, {crop}x{crop} crops, flips {flips}
- Adam (betas {betas}), lr {lr} cosine-annealed to {min_lr}, gradient clipping {grad_clip}, EMA {ema}
- loss: the paper's Eq. 1-4 over the four output scales (Charbonnier eps {eps} + {edge} x edge + {freq} x FFT L1)

{notes}

## Evaluation

{table}

## Use

```python
import algnet_core

restored = algnet_core.deblur(image, model="path/to/this/folder")  # or the Hub repo id
```

## Config

```yaml
{config}```
"""


def metrics_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of blurry-vs-restored PSNR/SSIM rows (plus a reproduce column when given)."""
    header = "| benchmark | images | blurry PSNR | blurry SSIM | restored PSNR | restored SSIM | gain (dB) |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = r["psnr"] - r["psnr_blurry"]
        lines.append(
            f"| {r['benchmark']} | {r['images']} | {r['psnr_blurry']:.2f} | {r['ssim_blurry']:.4f} "
            f"| {r['psnr']:.2f} | {r['ssim']:.4f} | {gain:+.2f} |"
        )
    commands = [f"- {r['benchmark']}: `{r['command']}`" for r in rows if r.get("command")]
    if commands:
        lines += ["", "Reproduce:", "", *commands]
    return "\n".join(lines)


def model_card(config: dict[str, Any], steps: int, rows: Sequence[dict[str, Any]], params: int) -> str:
    """The README.md text for an exported folder."""
    run, optim, loss, data = config["run"], config["optim"], config["loss"], config["data"]
    export = config.get("export", {})
    recipe = data["train"].get("recipe", {})
    tasks = {"motion": "motion deblurring", "defocus": "defocus deblurring", "psf": "deblurring of one measured PSF"}
    task = tasks.get(recipe.get("kind", ""), "image deblurring")
    flips = "+".join(k for k, v in data["flips"].items() if v) or "none"
    return CARD_TEMPLATE.format(
        name=config["name"],
        preset=config["model"]["preset"],
        params=params,
        task=task,
        training_data=export.get("training_data") or f"`{data['train']}`",
        steps=steps,
        total_steps=run["steps"],
        batch=run["batch"],
        crop=data["crop"],
        flips=flips,
        betas=tuple(optim["betas"]),
        lr=optim["lr"],
        min_lr=optim["min_lr"],
        grad_clip=optim["grad_clip"] or "off",
        ema=run["ema_decay"] or "off",
        eps=loss["eps"],
        edge=loss["edge_weight"],
        freq=loss["freq_weight"],
        notes=export.get("notes", "").strip(),
        table=metrics_table(rows) if rows else "No evaluation yet.",
        config=yaml.safe_dump(config, sort_keys=False),
    )


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, extra_rows: Sequence[dict[str, Any]] = (), overwrite: bool = False
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` for a ``best.pt`` checkpoint.

    The run's validation result (if any) is the first row of the evaluation table, ``extra_rows``
    follow. A non-empty ``out_dir`` is refused unless ``overwrite``. Returns the folder.
    """
    out_dir = Path(out_dir)
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: choose a new folder or pass --overwrite")
    state = load_checkpoint(checkpoint)
    model = ALGNet(**state["model_kwargs"])
    model.load_state_dict(state["model"])
    model.save_pretrained(out_dir)
    rows = []
    if state["metrics"]:
        rows.append({"benchmark": f"validation ({state['config']['name']}, step {state['metrics']['step']})"})
        rows[0].update(state["metrics"])
    rows += list(extra_rows)
    params = sum(p.numel() for p in model.parameters())
    (out_dir / "README.md").write_text(model_card(state["config"], state["step"], rows, params))
    return out_dir


def eval_rows(spec: str) -> list[dict[str, Any]]:
    """Table rows from ``NAME=FILE.json`` (or ``FILE.json``, named after the file): an ``algnet eval``
    report or a list of rows."""
    name, _, path = spec.rpartition("=")
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return data
    mean = data["mean"]
    row = {"benchmark": name or Path(path).stem, "images": len(data["images"])}
    for metric in ("psnr", "ssim"):
        row[f"{metric}_blurry"], row[metric] = mean["blurry"][metric], mean["restored"][metric]
    return [row]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.export CHECKPOINT OUT_DIR [--eval NAME=FILE.json ...]``."""
    parser = argparse.ArgumentParser(prog="python -m train.export", description=main.__doc__)
    parser.add_argument("checkpoint", help="best.pt of a training run (LOG_DIR/best.pt)")
    parser.add_argument("out_dir", help="save_pretrained folder to write")
    parser.add_argument(
        "--eval", nargs="*", default=[], metavar="NAME=FILE.json", help="`algnet eval --json` reports or row lists"
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    args = parser.parse_args(argv)
    rows = [row for spec in args.eval for row in eval_rows(spec)]
    print(export_checkpoint(args.checkpoint, args.out_dir, rows, overwrite=args.overwrite))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
