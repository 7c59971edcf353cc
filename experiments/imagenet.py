"""Train AttentionViG (or any timm model) with the AttentionViG paper's recipe.

    python experiments/imagenet.py --preset cpu-demo                  # embedded Fashion-MNIST, CPU
    python experiments/imagenet.py --data-dir /data/imagenet --graph svga   # ImageNet layout
    torchrun --nproc-per-node 16 experiments/imagenet.py --data-dir ...     # many processes
    python experiments/imagenet.py --resume runs/x/last.pth          # continue where it stopped
    python experiments/imagenet.py --eval-only --checkpoint runs/x/best.pth

All options: --help. The engine (experiments/engine.py) is shared with experiments/ablation.py.
"""
import engine


def main(argv=None) -> None:
    args = engine.parse_args(argv)
    if args.eval_only:
        engine.evaluate_checkpoint(args)
        return
    summary = engine.train(args)
    final = summary["final"]["eval"]
    data = str(args.data_dir) if args.data_dir else "Fashion-MNIST official test split"
    print(f"{args.model}: top-1 {final['top1']:.2f}% / top-5 {final['top5']:.2f}% on "
          f"{data} after {summary['epochs']} epochs ({summary['train_seconds'] / 60:.1f} min of "
          f"training); best top-1 {summary['best']['top1']:.2f}% at epoch "
          f"{summary['best']['epoch']}")


if __name__ == "__main__":
    main()
