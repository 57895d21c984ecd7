"""PNG pictures of a run (loss curves); matplotlib with the Agg backend, so no display is needed."""

from __future__ import annotations

from pathlib import Path


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path) -> Path | None:
    """One line per phase or run, training loss against optimizer step. None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for name, points in curves.items():
        if not points:
            continue
        steps = [offset + s for s, _ in points]
        ax.plot(steps, [loss for _, loss in points], label=name)
        if name.startswith("base"):
            offset = steps[-1]  # CPT runs continue from where the base training stopped
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("cpt-plugin: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
