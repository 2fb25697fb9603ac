"""Plots of benchmark results (matplotlib, Agg backend; reads the JSON-ready dicts)."""

from __future__ import annotations

from pathlib import Path

CATEGORY_ORDER = ("coding", "chat", "summarization")
# one colour per policy across every plot (matplotlib's default cycle, fixed order)
POLICY_COLORS = {
    "autoregressive": "tab:blue",
    "sarathi": "tab:orange",
    "spec:2": "tab:green",
    "tree:2,2": "tab:red",
    "adaserve": "tab:purple",
}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, out: str | Path, dpi: int = 120) -> Path:
    """Lay out, write (creating the folder) and close `fig`; returns the path."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _load(point: dict) -> float:
    """Offered requests/s of a sweep point (1 / time-scale if all arrivals coincide)."""
    return point["offered_rps"] or 1.0 / point["time_scale"]


def plot_sweep(result: dict, out: str | Path) -> Path:
    """Attainment vs load and goodput vs load, one line per policy (the paper's Fig. 7 style).

    `result` is the sweep JSON: {"sweep": [{"offered_rps", "time_scale", "policies": {...}}]}.
    """
    plt = pyplot()
    points = sorted(result["sweep"], key=_load)
    policies = list(dict.fromkeys(name for p in points for name in p["policies"]))
    fig, (ax_a, ax_g) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in policies:
        ok = [p for p in points if "error" not in p["policies"].get(name, {"error": 1})]
        xs = [_load(p) for p in ok]
        att = [100 * (p["policies"][name]["attainment"] or 0.0) for p in ok]
        good = [p["policies"][name]["goodput_tokens_per_s"] for p in ok]
        marker = "*" if name == "adaserve" else "o"
        color = POLICY_COLORS.get(name)
        ax_a.plot(xs, att, marker=marker, label=name, color=color)
        ax_g.plot(xs, good, marker=marker, label=name, color=color)
    ax_a.set_xlabel("offered load (requests/s, scaled trace)")
    ax_a.set_ylabel("SLO attainment (%)")
    ax_a.set_ylim(0, 102)
    ax_a.grid(alpha=0.3)
    ax_g.set_xlabel("offered load (requests/s, scaled trace)")
    ax_g.set_ylabel("goodput (tokens/s of attained requests)")
    ax_g.grid(alpha=0.3)
    ax_a.legend(fontsize=8)
    settings = result.get("settings", {})
    fig.suptitle(
        f"{Path(settings.get('workload', 'workload')).name}: "
        f"{settings.get('num_requests', '?')} requests, output <= "
        f"{settings.get('max_output_len', '?')} tokens, baseline TPOT "
        f"{result.get('baseline_tpot_ms', float('nan')):.1f} ms",
        fontsize=10,
    )
    return save_figure(plt, fig, out)


def plot_run(result: dict, out: str | Path) -> Path:
    """One load point: attainment per category (grouped bars) and goodput per policy."""
    plt = pyplot()
    pols = {k: v for k, v in result["policies"].items() if "error" not in v}
    names = list(pols)
    cats = [c for c in CATEGORY_ORDER if any(c in p["per_category"] for p in pols.values())]
    groups = ["overall", *cats]
    fig, (ax_a, ax_g) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        p = pols[name]
        vals = [p["attainment"] or 0.0] + [
            p["per_category"].get(c, {}).get("attainment") or 0.0 for c in cats
        ]
        ax_a.bar(
            [i + k * width for i in range(len(groups))], [100 * v for v in vals], width, label=name
        )
    ax_a.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups)
    ax_a.set_ylabel("SLO attainment (%)")
    ax_a.set_ylim(0, 105)
    ax_a.legend(fontsize=8)
    ax_g.bar(names, [pols[n]["goodput_tokens_per_s"] for n in names])
    ax_g.set_ylabel("goodput (tokens/s)")
    ax_g.tick_params(axis="x", rotation=30)
    return save_figure(plt, fig, out)
