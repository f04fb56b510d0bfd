"""Diagnostics of a pool selection, shared by every sampling method (ODSD's APS, EIKD, DFND),
and the confusion plot of novel class discovery.

* `selection_report(pool_scores, selection, num_classes, related_sources=None)`: the numbers a
  user checks (size, per-class counts, mean teacher confidence, and on a tagged pool the share
  of each source and of the related sources) as a JSON-able dict for results.json.
* `plot_selection(path, pool_scores, selection, ...)`: `sampling.png` — teacher-confidence
  histograms of selected vs rejected pool images, per-class counts, source shares.
* `plot_selection_quality(path, curves, ...)`: `selection_quality.png` — the share of related
  images in a selection as its size N varies, one line per score (`pool.selection_quality`).
* `bn_statistics_distance(teacher_model, teacher_vars, images_batches)`: how far a set's
  per-layer activation statistics are from the teacher's BatchNorm running statistics, the only
  data-free summary of the original distribution (odsd.md §1 "Diagnostics").
* `plot_confusion(path, y_true, y_pred, mapping, num_known, num_novel)`: an NCD run's
  `confusion.png`, the matched task-agnostic confusion matrix.

`pool_scores` is a `kd_jax.pool.PoolScores` (or any object with `ids` sorted ascending, `pred`,
`confidence` and optionally `sources`, aligned); `selection` a `kd_jax.pool.Selection` or an
array of selected ids. Source tags are read only here, never by a selection rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from kd_jax import fileio


def _selected_mask(pool_scores, selection) -> np.ndarray:
    ids = np.asarray(pool_scores.ids)
    chosen = np.asarray(getattr(selection, "ids", selection))
    mask = np.isin(ids, chosen)
    missing = len(np.unique(chosen)) - int(mask.sum())
    if missing:
        raise KeyError(f"{missing} selected ids are not in the pool scores")
    return mask


def _selected_classes(pool_scores, selection, mask) -> np.ndarray:
    classes = getattr(selection, "classes", None)
    if classes is not None:
        return np.asarray(classes)
    return np.asarray(pool_scores.pred)[mask]


def _sources(pool_scores):
    sources = getattr(pool_scores, "sources", None)
    if sources is None:
        return None
    sources = np.asarray(sources).astype(str)
    return sources if len(sources) and (sources != "").any() else None


def selection_report(
    pool_scores, selection, num_classes: int, related_sources: Sequence[str] | None = None
) -> dict:
    """Numbers that describe a selection (all JSON-able).

    Keys: `selection_size`, `pool_size`, `selection_per_class` (list of C counts by the teacher
    class), `selection_mean_confidence` and `pool_mean_confidence` (max_c p_T), and when the pool
    carries source tags, `selection_source_share` / `pool_source_share` (tag -> fraction) and,
    with `related_sources` given, `selection_related_share` / `pool_related_share`.
    """
    mask = _selected_mask(pool_scores, selection)
    conf = np.asarray(pool_scores.confidence, np.float64)
    classes = _selected_classes(pool_scores, selection, mask)
    counts = np.bincount(np.asarray(classes, np.int64), minlength=num_classes)[:num_classes]
    report = {
        "selection_size": int(mask.sum()),
        "pool_size": int(len(mask)),
        "selection_per_class": [int(c) for c in counts],
        "selection_mean_confidence": float(conf[mask].mean()) if mask.any() else None,
        "pool_mean_confidence": float(conf.mean()) if len(conf) else None,
    }
    sources = _sources(pool_scores)
    if sources is not None:
        tags = sorted(set(sources))
        sel = sources[mask]
        report["selection_source_share"] = {
            t: float((sel == t).mean()) if len(sel) else 0.0 for t in tags
        }
        report["pool_source_share"] = {t: float((sources == t).mean()) for t in tags}
        if related_sources is not None:
            related = np.isin(sources, list(related_sources))
            report["selection_related_share"] = float(related[mask].mean()) if mask.any() else 0.0
            report["pool_related_share"] = float(related.mean())
    return report


def plot_selection(
    path: str, pool_scores, selection, num_classes: int | None = None, title: str = "pool selection"
) -> str:
    """Writes `path` (e.g. <workdir>/sampling.png): three panels —

    1. histogram of the teacher confidence max_c p_T of selected vs rejected pool images;
    2. per-class counts of the selection (and of the pool's teacher argmax, for reference);
    3. the share of each source tag in the selection vs the pool (when the pool has tags).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mask = _selected_mask(pool_scores, selection)
    conf = np.asarray(pool_scores.confidence, np.float64)
    pred = np.asarray(pool_scores.pred)
    num_classes = int(num_classes or (pred.max() + 1 if len(pred) else 1))
    classes = _selected_classes(pool_scores, selection, mask)
    sources = _sources(pool_scores)
    panels = 3 if sources is not None else 2
    fig = Figure(figsize=(4.2 * panels, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    bins = np.linspace(0.0, 1.0, 41)
    axes[0].hist(
        conf[~mask],
        bins=bins,
        alpha=0.6,
        label=f"rejected ({int((~mask).sum())})",
        color="tab:gray",
    )
    axes[0].hist(
        conf[mask], bins=bins, alpha=0.6, label=f"selected ({int(mask.sum())})", color="tab:blue"
    )
    axes[0].set_xlabel("teacher confidence max p_T")
    axes[0].set_ylabel("images")
    axes[0].legend(fontsize=8)
    x = np.arange(num_classes)
    sel_counts = np.bincount(np.asarray(classes, np.int64), minlength=num_classes)[:num_classes]
    pool_counts = np.bincount(pred.astype(np.int64), minlength=num_classes)[:num_classes]
    if num_classes <= 20:
        axes[1].bar(
            x - 0.2, pool_counts, width=0.4, label="pool (teacher argmax)", color="tab:gray"
        )
        axes[1].bar(x + 0.2, sel_counts, width=0.4, label="selected", color="tab:blue")
        axes[1].set_xticks(x)
    else:  # many classes: sorted counts read better than 1000 bars
        axes[1].plot(np.sort(pool_counts)[::-1], label="pool (teacher argmax)", color="tab:gray")
        axes[1].plot(np.sort(sel_counts)[::-1], label="selected", color="tab:blue")
        axes[1].set_xlabel("classes, sorted by count")
    axes[1].set_title("per-class counts", fontsize=9)
    axes[1].legend(fontsize=8)
    if sources is not None:
        tags = sorted(set(sources))
        sel = sources[mask]
        y = np.arange(len(tags))
        axes[2].barh(
            y + 0.2,
            [(sources == t).mean() for t in tags],
            height=0.4,
            label="pool",
            color="tab:gray",
        )
        axes[2].barh(
            y - 0.2,
            [(sel == t).mean() if len(sel) else 0 for t in tags],
            height=0.4,
            label="selected",
            color="tab:blue",
        )
        axes[2].set_yticks(y)
        axes[2].set_yticklabels(tags, fontsize=8)
        axes[2].set_xlabel("share")
        axes[2].set_title("source share", fontsize=9)
        axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fileio.save_figure_atomic(path, fig)
    return path


def plot_selection_quality(
    path: str,
    curves: dict,
    pool_share: float | None = None,
    mark: tuple | None = None,
    title: str = "selection quality",
) -> str:
    """Writes `path` (e.g. <workdir>/selection_quality.png): for each score (`curves`: name ->
    {N: related share}) the share of related images in its selection of N, N on a log axis;
    `pool_share` (the random-subset level) dashed, `mark` = (N, share) the run's own selection."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, curve in curves.items():
        if curve:
            n = sorted(curve)
            ax.plot(n, [100 * curve[k] for k in n], marker="o", ms=3, label=name)
    if pool_share is not None:
        ax.axhline(100 * pool_share, color="tab:gray", ls="--", lw=1, label="pool (random N)")
    if mark is not None:
        ax.plot([mark[0]], [100 * mark[1]], "k*", ms=10, label=f"this run (N = {mark[0]})")
    ax.set_xscale("log")
    sizes = sorted({n for curve in curves.values() for n in curve})
    ax.minorticks_off()
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(n) for n in sizes], fontsize=7)
    ax.set_xlabel("selection size N")
    ax.set_ylabel("related images in the selection (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fileio.save_figure_atomic(path, fig)
    return path


# ---------------------------------------------------------------------------------------------
# BN-statistics distance
# ---------------------------------------------------------------------------------------------


def has_batch_norm(variables) -> bool:
    """Whether a model's variables hold BatchNorm running statistics."""
    import jax

    stats = variables.get("batch_stats") if hasattr(variables, "get") else None
    return bool(stats) and len(jax.tree.leaves(stats)) > 0


def _moments_fn(model):
    """jit'able (variables, images, mask) -> {bn path: (sum x, sum x², count, run mean, run var)}.

    Every `nn.BatchNorm` call is intercepted: its *input* statistics per channel (over all
    axes but the last) are accumulated, and its running statistics read, in eval mode (the
    teacher exactly as it sees the data).
    """
    import flax.linen as nn
    import jax.numpy as jnp

    def moments(variables, images, mask):
        records = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
                x = jnp.asarray(args[0], jnp.float32)
                m = mask.reshape((-1,) + (1,) * (x.ndim - 1))
                axes = tuple(range(x.ndim - 1))
                per_item = float(np.prod(x.shape[1:-1])) if x.ndim > 2 else 1.0
                key = "/".join(str(p) for p in module.scope.path)
                records[key] = (
                    jnp.sum(x * m, axes),
                    jnp.sum(x * x * m, axes),
                    jnp.sum(mask) * per_item,
                    module.get_variable("batch_stats", "mean"),
                    module.get_variable("batch_stats", "var"),
                )
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply(variables, images, train=False)
        return records

    return moments


def bn_statistics_distance(teacher_model, teacher_vars, images_batches: Iterable) -> float | None:
    """Σ_l ‖μ_l(D) − μ_l^BN‖² + ‖σ²_l(D) − σ²_l^BN‖² over the teacher's BatchNorm layers.

    μ_l(D), σ²_l(D): per-channel mean and (biased) variance of the input of BN layer l over
    every image of D (and every spatial position), with the teacher in eval mode; μ^BN, σ²^BN
    its running statistics. Lower = D looks more like the teacher's training data to the
    teacher. `images_batches` yields arrays [B, H, W, C] (already preprocessed into the
    teacher's domain) or dicts with "image" and optional "mask". Returns None when the teacher
    has no BatchNorm (e.g. LeNet-5) or no image was given.
    """
    import jax
    import jax.numpy as jnp

    if not has_batch_norm(teacher_vars):
        return None
    step = jax.jit(_moments_fn(teacher_model))
    totals = None
    for batch in images_batches:
        if isinstance(batch, dict):
            images = np.asarray(batch["image"])
            mask = np.asarray(batch.get("mask", np.ones(len(images))), np.float32)
        else:
            images, mask = np.asarray(batch), np.ones(len(batch), np.float32)
        out = jax.device_get(step(teacher_vars, jnp.asarray(images), jnp.asarray(mask)))
        if totals is None:
            totals = {
                k: [
                    np.asarray(v[0], np.float64),
                    np.asarray(v[1], np.float64),
                    float(v[2]),
                    np.asarray(v[3], np.float64),
                    np.asarray(v[4], np.float64),
                ]
                for k, v in out.items()
            }
        else:
            for k, v in out.items():
                totals[k][0] += v[0]
                totals[k][1] += v[1]
                totals[k][2] += float(v[2])
    if not totals:
        return None
    distance = 0.0
    for s1, s2, n, run_mean, run_var in totals.values():
        if n <= 0:
            continue
        mean = s1 / n
        var = np.maximum(s2 / n - mean**2, 0.0)
        distance += float(np.sum((mean - run_mean) ** 2) + np.sum((var - run_var) ** 2))
    return distance


def plot_confusion(
    path: str, y_true, y_pred, mapping: dict, num_known: int, num_novel: int
) -> None:
    """Writes `path` (<workdir>/confusion.png of an NCD run): the task-agnostic confusion
    matrix on the test set after Hungarian matching (`mapping`: prediction -> class), the
    known | novel boundary drawn in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = num_known + num_novel
    mapped = np.array([mapping.get(int(p), -1) for p in y_pred])
    conf = np.zeros((c, c), np.int64)
    ok = mapped >= 0
    np.add.at(conf, (y_true[ok], mapped[ok]), 1)
    size = min(12.0, 3.0 + 0.25 * c)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(conf, cmap="Blues")
    ax.axhline(num_known - 0.5, color="red", lw=0.8)
    ax.axvline(num_known - 0.5, color="red", lw=0.8)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if conf[i, j]:
                    ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted (matched) class; known | novel")
    ax.set_ylabel("true class; known | novel")
    ax.set_title(f"task-agnostic test confusion ({int(ok.sum())}/{len(y_true)} matched)")
    fig.tight_layout()
    try:
        fileio.save_figure_atomic(path, fig, dpi=100)
    finally:
        plt.close(fig)


def run_summary(results: dict, workdir: str, reference: str = "") -> str:
    """The lines a person reads at a glance when a run ends: teacher and student accuracy, the
    transfer set's composition (a pool selection with source tags), `reference` (a config's
    measured baselines, e.g. README table rows) and the diagnostic files written."""
    lines = [f"summary of {workdir}"]
    run = f"  {results['method']} ({results['model']})"
    after = f"after {results['steps']} steps, {results.get('wall_seconds', 0.0):.0f} s"
    if results.get("miou") is not None:
        # Segmentation: mIoU is the figure; pixel accuracy (what `*_accuracy` hold) is mostly
        # background and would read as a good result for a background-only predictor.
        if results.get("teacher_miou") is not None:
            pixels = results.get("teacher_accuracy")
            lines.append(
                f"  teacher mIoU       {results['teacher_miou']:.3f}"
                + (f" (pixel accuracy {100 * pixels:.1f} %)" if pixels is not None else "")
            )
        lines.append(
            f"{run} mIoU {results['miou']:.3f} "
            f"(pixel accuracy {100 * results['pixel_accuracy']:.1f} %) {after}"
        )
    else:
        if results.get("teacher_accuracy") is not None:
            lines.append(f"  teacher accuracy   {100 * results['teacher_accuracy']:.1f} %")
        lines.append(
            f"{run} accuracy {100 * results['final_accuracy']:.1f} % "
            f"(best {100 * results['best_accuracy']:.1f} %) {after}"
        )
    sel = results.get("selection") or {}
    if sel.get("selection_size"):
        lines.append(
            f"  transfer set       {sel['selection_size']:,} of {sel['pool_size']:,} pool images"
        )
        if sel.get("selection_related_share") is not None:
            lines.append(
                f"  related images     {100 * sel['selection_related_share']:.1f} % of the "
                f"selection ({100 * sel['pool_related_share']:.1f} % of the pool)"
            )
        shares = sel.get("selection_source_share") or {}
        if shares:
            by_share = sorted(shares.items(), key=lambda kv: -kv[1])
            lines.append(
                "  by source          " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in by_share)
            )
    if reference:
        lines.append(f"  reference          {reference}")
    written = [
        fileio.join(workdir, name)
        for name in ("sampling.png", "selection_quality.png", "confusion.png", "results.json")
        if fileio.exists(fileio.join(workdir, name))
    ]
    if written:
        lines.append("  files              " + ", ".join(written))
    return "\n".join(lines)
