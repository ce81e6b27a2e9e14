"""CVLM: explain a chest X-ray report generator by cyclic manipulation (arXiv 2411.05261), with
measured faithfulness.

The pieces (see ``docs/cvlm.md``): procedural phantoms with ground-truth masks (``phantoms``),
report text - writing, a CheXpert-style labeller and edits of a generator's own text
(``report_text``), the ``ReportGenerator`` interface and the default CNN generator
(``generator``), a Hugging Face adapter (``hf``), real images and report folders (``data``), the
report-conditioned manipulator (``manipulator``), explanation maps and baselines (``explain``),
metrics (``metrics``), the evaluation with intervals (``evaluate``), the demo (``pipeline``) and
its HTML page (``html_report``), and the device all of it runs on (``devices``).
"""

__version__ = "0.2.0"
