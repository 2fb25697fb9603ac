"""Figures 8/9-style plots of a simulated load sweep (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from adaserve_jax.bench.plots import pyplot, save_figure

STYLE = {
    "autoregressive": ("tab:gray", "o"),
    "sarathi": ("tab:brown", "s"),
    "adaserve": ("tab:red", "*"),
}
OTHER = ["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:cyan", "tab:olive"]


def plot_load_sweep(result: dict, out: str | Path, title: str | None = None) -> Path:
    """Attainment and goodput vs offered load (one line per policy), then attainment per SLO
    category (coding, chat) vs load: the AdaServe paper's Figures 8 and 9 layout."""
    plt = pyplot()
    points = sorted(result["sweep"], key=lambda p: p["offered_rps"] or 0.0)
    policies = list(dict.fromkeys(n for p in points for n in p["policies"]))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    panels = [
        ("SLO attainment (%)", lambda s: 100 * (s["attainment"] or 0.0)),
        ("goodput (tokens/s of attained requests)", lambda s: s["goodput_tokens_per_s"]),
        ("coding attainment (%)", lambda s: 100 * s["per_category"]["coding"]["attainment"]),
        ("chat attainment (%)", lambda s: 100 * s["per_category"]["chat"]["attainment"]),
    ]
    extra = iter(OTHER)
    colors = {n: STYLE.get(n) or (next(extra), "o") for n in policies}
    for ax, (label, value) in zip(axes, panels, strict=True):
        for name in policies:
            xs = [p["offered_rps"] for p in points if name in p["policies"]]
            ys = [value(p["policies"][name]) for p in points if name in p["policies"]]
            color, marker = colors[name]
            ax.plot(xs, ys, marker=marker, color=color, label=name, ms=9 if marker == "*" else 6)
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if "%" in label:
            ax.set_ylim(0, 103)
    axes[0].legend(fontsize=8)
    st = result.get("settings", {})
    fig.suptitle(
        title
        or f"simulated {st.get('profile', '')}: max batch {st.get('max_batch')}, token budget "
        f"{st.get('token_budget')}, baseline TPOT {result['baseline_tpot_ms']:g} ms",
        fontsize=10,
    )
    return save_figure(plt, fig, out, dpi=110)
