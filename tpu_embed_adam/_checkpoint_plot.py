"""A PNG of each embedding table's row-norm and Adam `v` histograms."""

import numpy as np

from tpu_embed_adam._checkpoint_inspect import Table


def write_png(tables: list[Table], path: str) -> None:
    """Writes one row of two histograms per table (row L2 norms; `v` values) to `path`.

    Args:
      tables: `_checkpoint_inspect.read_tables`' result, at least one.
      path: the PNG file to write.

    Raises:
      ValueError: a table or its `v` holds NaN or infinity (a histogram's
        range must be finite); nothing is written.
      ImportError: matplotlib is not installed (it is optional).
      OSError: `path` cannot be written.
    """
    for table in tables:
        _check_finite(table)
    # The object API, not pyplot: no global figure state and no GUI backend.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3 * len(tables)), layout="tight")
    axes = figure.subplots(len(tables), 2, squeeze=False)
    for (norms_axis, v_axis), table in zip(axes, tables, strict=True):
        norms_axis.hist(table.row_norms, bins=50)
        norms_axis.set_title(f"{table.name}: row L2 norms")
        if table.v is None:
            v_axis.set_axis_off()
            v_axis.text(0.5, 0.5, "no Adam/v slot", ha="center", va="center")
        else:
            # v spans orders of magnitude and is mostly zero on untouched rows: log counts.
            v_axis.hist(table.v.ravel(), bins=50, log=True)
            v_axis.set_title(f"{table.name}: Adam v")
    figure.savefig(path, format="png")


def _check_finite(table: Table) -> None:
    rows = int(np.count_nonzero(~np.isfinite(table.row_norms)))
    values = 0 if table.v is None else int(np.count_nonzero(~np.isfinite(table.v)))
    if rows or values:
        raise ValueError(
            f"table `{table.name}` cannot be plotted: {rows} of its {table.shape[0]} rows and "
            f"{values} of its Adam v values hold NaN or infinity (a histogram needs finite "
            "values; inspect without --plot summarizes it)"
        )
