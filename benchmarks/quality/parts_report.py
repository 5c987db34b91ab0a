"""The extended study's results as Markdown tables, and the budget part's plot of dev accuracy against steps."""

from __future__ import annotations

from pathlib import Path

from .parts import METRIC


def _cell(stat: dict | None) -> str:
    return "" if stat is None else f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def _signed(stat: dict) -> str:
    return f"{stat['mean']:+.1f} ± {stat['std']:.1f}"


def rows_table(rows: list[dict], extra: tuple[str, ...] = ()) -> list[str]:
    head = ["method", "serving", "steps", "train synsets", "served params", "dev loss", f"dev {METRIC}",
            "dev ranked", f"test {METRIC}", "test ranked", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["serving"], str(r["steps"]), str(r["train_size"]), f"{r['served_parameters']:,}",
                 f"{r['dev_loss']['mean']:.3f} ± {r['dev_loss']['std']:.3f}", _cell(r.get(f"dev/{METRIC}")),
                 _cell(r.get("dev/ranked_accuracy")), _cell(r.get(f"test/{METRIC}")),
                 _cell(r.get("test/ranked_accuracy"))]
        lines.append("| " + " | ".join(cells + [r.get(e, "") for e in extra]) + " |")
    return lines


def markdown(results: dict) -> str:
    lines = []
    for part, result in results.items():
        lines += [f"**{part}** ({result['seconds'] / 60:.0f} min)", ""]
        if part == "budget":
            chosen = ", ".join(m["name"] for m in result["sweep"]["chosen"].values())
            lines += [f"Sweep (first seed, first budget; chosen on dev: {chosen}):", ""]
            lines += rows_table(result["sweep"]["rows"]) + [""]
            lines += rows_table(result["rows"]) + [""]
            comparisons = result["comparisons"]
            lines += [f"Test {METRIC}, AdaMix-LoRA (merged) minus LoRA, seed by seed: "
                      + "; ".join(f"{steps} steps {_signed(d)}" for steps, d in comparisons["equal_steps"].items())
                      + "."]
            best = comparisons["best_dev"]
            lines += ["Each at its best dev budget: " + "; ".join(
                f"{name} {b['steps']} steps, test {_cell(b['test'])}" for name, b in best.items())
                + f"; difference {_signed(comparisons['best_dev_difference'])}.", ""]
        elif part == "lowdata":
            lines += [f"{result['train_size']} training synsets, rank {result['rank']}, {result['steps']} steps.", ""]
            lines += rows_table(result["rows"]) + [""]
            for name, curves in result["dev_loss_curves"].items():
                lowest = [min(curve, key=lambda point: point[1]) for curve in curves]
                finals = [curve[-1] for curve in curves]
                lines.append(f"{name}: lowest dev loss at steps {[s for s, _ in lowest]} "
                             f"({', '.join(f'{v:.3f}' for _, v in lowest)}), final "
                             f"({', '.join(f'{v:.3f}' for _, v in finals)}).")
            lines.append("")
        else:
            lines += rows_table(result["rows"]) + [""]
    return "\n".join(lines) + "\n"


def plot_budget(result: dict, path: Path) -> Path:
    """Dev accuracy (mean ± standard deviation over seeds) against training steps, one line per method and serving."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    series: dict[str, list] = {}
    for row in result["rows"]:
        series.setdefault(f"{row['method']} {row['serving']}", []).append(row)
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["steps"])
        means = [r[f"dev/{METRIC}"]["mean"] for r in rows]
        errors = [r[f"dev/{METRIC}"]["std"] for r in rows]
        axis.errorbar([r["steps"] for r in rows], means, yerr=errors, marker="o", capsize=3, label=label)
    axis.set_xscale("log")
    axis.set_xlabel("fine-tuning steps (16 examples each)")
    axis.set_ylabel(f"dev {METRIC} (%)")
    axis.set_title("supersense: dev accuracy against budget")
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
