"""The benchmark's pictures (matplotlib, written as PNG without a display)."""
from typing import Dict, List

from ppdistill.optional import require

__all__ = ['plot_accuracy', 'plot_losses']


def _pyplot():
    matplotlib = require('matplotlib', 'the benchmark pictures')
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy(summary: List[dict], path: str, title: str = '') -> None:
    """AP per row: mean with ± std error bars and each seed as a dot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(summary), 3.6))
    for i, e in enumerate(summary):
        ax.errorbar([i], [e['mean']['AP']], yerr=[e['std']['AP'] or 0.0], fmt='o', capsize=6, ms=8)
        ax.plot([i] * e['n'], e['values']['AP'], 'k.', alpha=0.5)
    ax.set_xticks(range(len(summary)))
    ax.set_xticklabels([e['row'] for e in summary])
    ax.set_ylabel('COCO AP (mean ± std over seeds)')
    ax.set_title(title, fontsize=9)
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _is_term(key: str, keys) -> bool:
    """A distill term per level (``distill_mgd_l0``), not the total and not a sub-term of another key."""
    return (key.startswith('distill_') and key != 'distill_loss'
            and not any(key != k and key.startswith(k + '_') for k in keys))


def plot_losses(curves: Dict[str, Dict[int, List[dict]]], path: str) -> None:
    """Training curves from the runs' step records (``train_log.jsonl``, see :class:`ppdistill.trainer.TrainLog`).

    ``curves``: row -> seed -> step records. Panels: total loss; detection loss (the student's own,
    ``det_loss``); each distill term per level. One colour per row, one line per seed.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for i, (row, seeds) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        for j, (seed, logged) in enumerate(sorted(seeds.items())):
            if not logged:
                continue
            iters = [r['iter'] for r in logged]
            label = row if j == 0 else None
            axes[0].plot(iters, [r.get('loss', float('nan')) for r in logged], color=colour, alpha=0.7,
                         label=label)
            axes[1].plot(iters, [r.get('det_loss', float('nan')) for r in logged],
                         color=colour, alpha=0.7, label=label)
            keys = set().union(*logged)
            for k, term in enumerate(sorted(k for k in keys if _is_term(k, keys))):
                axes[2].plot(iters, [r.get(term, float('nan')) for r in logged], color=colour, alpha=0.7,
                             ls=['-', '--', ':', '-.'][k % 4], label=f'{row}: {term}' if j == 0 else None)
    for ax, title in zip(axes, ['training loss (total)', 'detection loss (the student\'s own)',
                                'distill terms per level']):
        ax.set_title(title)
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
