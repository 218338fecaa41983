"""Reports: Markdown sections, training-curve plots, and the demo (``reslab.report.demo.run_demo``)."""
from reslab.report.markdown import ReportSection, markdown_table, render_report, write_report
from reslab.report.plots import training_curves

__all__ = ["ReportSection", "markdown_table", "render_report", "training_curves", "write_report"]
