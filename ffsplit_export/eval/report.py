"""Heavy-hitter plots and summary tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..calibrate import FFNStats

SHARES = (5, 10, 20)


def summary_rows(stats: dict[str, FFNStats]) -> list[dict]:
    rows = []
    for st in stats.values():
        row = {"ffn": st.name, "neurons": int(st.act_sq.numel()), "tokens": st.n_tokens}
        for p in SHARES:
            row[f"top{p}%"] = st.top_share(p / 100)
        row["top10%_act"] = st.top_share(0.10, by="act")
        rows.append(row)
    return rows


def format_table(rows: list[dict], floatfmt: str = ".3f") -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[format(r[c], floatfmt) if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells]
    return "\n".join(out)


def plot_heavy_hitters(stats: dict[str, FFNStats], out_dir: Path) -> list[Path]:
    """Sorted score curves per layer, and the top 5/10/20 % share of every layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(stats)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(names):
        s = np.sort(stats[name].score.numpy())[::-1]
        ax.plot(
            np.arange(1, s.size + 1) / s.size * 100,
            s / max(s[0], 1e-30),
            color=cmap(i / max(1, len(names) - 1)),
            lw=0.9,
            label=name if len(names) <= 12 else None,
        )
    ax.set_yscale("log")
    ax.set_xlabel("neuron rank (% of the layer's intermediate neurons)")
    ax.set_ylabel("score / max score (log)")
    ax.set_title("Heavy-hitter scores ||a_j||·||W_down[:,j]||, sorted, per FFN")
    if len(names) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    p1 = out_dir / "score_curves.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 4.5))
    x = np.arange(len(names))
    for k, p in enumerate(SHARES):
        ax.bar(
            x + (k - 1) * 0.27, [stats[n].top_share(p / 100) for n in names], width=0.27, label=f"top {p}%"
        )
        ax.axhline(p / 100, color=f"C{k}", ls=":", lw=0.8)
    ax.set_xticks(x, [str(i) for i in x], fontsize=7)
    ax.set_xlabel("FFN (model order; dotted: the share if all neurons were equal)")
    ax.set_ylabel("share of summed FFN output norm")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Share of FFN output carried by the top neurons")
    fig.tight_layout()
    p2 = out_dir / "top_share.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]
