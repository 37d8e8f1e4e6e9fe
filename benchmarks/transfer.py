"""Transfer benchmark (``make transfer``): does a pretext task help dense prediction, on a CPU, in under an hour?

Rows: MCL with 3 levels, the same with levels=1 (the single-level baseline), and no pretraining. Each pretraining
runs the same recipe and number of steps on Fashion-MNIST; each row then fine-tunes the same Faster R-CNN
R18-FPN v2 for the same number of steps on the Fashion-MNIST canvas detection set (objects pasted at widely varying
scales). Writes ``benchmarks/results/transfer.md`` (AP table), ``transfer.json``, the AP-by-IoU plot (the paper's
Fig. 6) and the canvas set's scale-spread plot (Fig. 5).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from mcl.detection.analysis import plot_ap_by_iou, plot_scale_spread
from mcl.detection.fashion_canvas import CanvasSpec, build_fashion_canvas, object_scale_spread
from mcl.detection.finetune import finetune
from mcl.train import CONFIG_DIR, train

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RUNS = ROOT / "runs"
ROWS = {"MCL, 3 levels": ["levels=3"], "MCL, 1 level": ["levels=1"], "no pretraining": None}
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def composed(config: str, overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config, overrides)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


def pretrain(name: str, overrides: list[str], args: argparse.Namespace) -> tuple[Path, dict]:
    output = RUNS / name.replace(", ", "_").replace(" ", "_")
    common = [
        f"trainer.max_epochs={args.pretrain_epochs}", f"data.train_size={args.pretrain_images}",
        "trainer.enable_progress_bar=false", "validate_at_init=false",
    ]  # fmt: skip
    started = time.perf_counter()
    metrics = train(composed("train", [*common, *overrides], output))
    return output / "checkpoints" / "last.ckpt", {"pretrain_s": time.perf_counter() - started, **metrics}


def fine_tune(name: str, checkpoint: Path | None, data: Path, args: argparse.Namespace) -> dict:
    output = RUNS / f"finetune_{name.replace(', ', '_').replace(' ', '_')}"
    overrides = [
        f"data.root={data}", f"schedule.max_epochs={args.finetune_epochs}", "schedule.warmup_steps=50",
        f"model.min_size={args.canvas}", f"model.max_size={args.canvas}", "trainer.enable_progress_bar=false",
        f"+trainer.check_val_every_n_epoch={args.finetune_epochs}",
        f"model.pretrained={checkpoint}" if checkpoint else "model.pretrained=null",
    ]  # fmt: skip
    started = time.perf_counter()
    metrics = finetune(composed("finetune", overrides, output))
    return {"finetune_s": time.perf_counter() - started, **metrics}


def markdown(rows: dict[str, dict], args: argparse.Namespace, spread: dict) -> str:
    lines = [
        "# Transfer benchmark: Fashion-MNIST canvases, Faster R-CNN R18-FPN v2",
        "",
        f"Pretraining: {args.pretrain_epochs} epochs x {args.pretrain_images} Fashion-MNIST images (ResNet-18, 64 px, "
        f"batch 64). Fine-tuning: {args.finetune_epochs} epochs on {args.train_canvases} canvases of {args.canvas} px, "
        f"evaluated on {args.val_canvases}. Object scale std {spread['std']:.1f} px (mean {spread['mean']:.1f}).",
        "",
        "| pretraining | kNN top-1 | " + " | ".join(STATS) + " | pretrain min | fine-tune min |",
        "| --- | ---: | " + " | ".join("---:" for _ in STATS) + " | ---: | ---: |",
    ]
    for name, row in rows.items():
        knn = f"{row['val/knn_top1']:.1f}" if "val/knn_top1" in row else "-"
        aps = " | ".join(f"{row[f'val/{s}']:.1f}" for s in STATS)
        pre = f"{row['pretrain_s'] / 60:.1f}" if "pretrain_s" in row else "-"
        lines.append(f"| {name} | {knn} | {aps} | {pre} | {row['finetune_s'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the whole pipeline")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--pretrain-images", type=int, default=5760)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--train-canvases", type=int, default=320)
    parser.add_argument("--val-canvases", type=int, default=80)
    parser.add_argument("--canvas", type=int, default=128)
    args = parser.parse_args()
    if args.quick:
        args.pretrain_epochs, args.pretrain_images, args.finetune_epochs = 1, 128, 1
        args.train_canvases, args.val_canvases = 8, 4
    started = time.perf_counter()
    data = RUNS / "fashion_canvas"
    spec = CanvasSpec(canvas_size=args.canvas, min_side=8, max_side=args.canvas * 3 // 4)
    paths = build_fashion_canvas(data, args.train_canvases, args.val_canvases, seed=0, spec=spec)
    rows: dict[str, dict] = {}
    for name, overrides in ROWS.items():
        checkpoint, pretrain_metrics = pretrain(name, overrides, args) if overrides else (None, {})
        rows[name] = {**pretrain_metrics, **fine_tune(name, checkpoint, data, args)}
        print(f"{name}: AP {rows[name]['val/AP']:.2f} after {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    spread = object_scale_spread(paths["train"])
    table = markdown(rows, args, spread)
    (RESULTS / f"transfer{suffix}.md").write_text(table)
    (RESULTS / f"transfer{suffix}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    curves = {name: {float(t): ap for t, ap in row["ap_by_iou"].items()} for name, row in rows.items()}
    plot_ap_by_iou(curves, "no pretraining", RESULTS / f"transfer_ap_by_iou{suffix}.png")
    plot_scale_spread({"canvas train": paths["train"]}, RESULTS / f"transfer_scale_spread{suffix}.png")
    print(table)
    print(f"total {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
