"""The final table (Markdown) and the reward curve (PNG) of augmentation runs."""
from __future__ import annotations

METHOD_NAMES = {
    "full": "generator + reinforced selector (full)", "none": "KD without augmentation",
    "tinybert": "TinyBERT word replacement", "mixkd": "MixKD embedding mixup", "source": "source data, unchanged",
    "random": "generator, random keep", "confidence": "generator, confidence selector",
}


def markdown_table(results):
    """``results``: loop results (``AugmentLoop.run``). One row per method."""
    lines = ["| method | eval EM | eval F1 | held-out dev F1 | kept samples |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {METHOD_NAMES.get(r['method'], r['method'])} | {r['eval']['exact_match']:.2f} | "
                     f"{r['eval']['f1']:.2f} | {r['held_out_dev']['f1']:.2f} | {r['kept']} |")
    return "\n".join(lines)


def plot_rewards(episodes, path, title="learning to augment: selector reward"):
    """Reward, its moving baseline and the student's dev F1 per episode -> PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [e for e in episodes if "reward" in e]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [e["episode"] for e in eps]
    ax.plot(x, [e["reward"] for e in eps], "o-", label="reward (dev F1 change)")
    ax.plot(x, [e["baseline"] for e in eps], "--", label="moving baseline")
    ax.set_xlabel("episode")
    ax.set_ylabel("F1 points")
    ax2 = ax.twinx()
    ax2.plot(x, [e["dev_f1"] for e in eps], "s:", color="gray", label="student dev F1")
    ax2.set_ylabel("dev F1")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
