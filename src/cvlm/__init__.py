"""CVLM: explain a chest X-ray report generator by cyclic manipulation, with measured faithfulness.

The pieces (see ``docs/cvlm.md``): procedural phantoms with ground-truth masks (``phantoms``),
radiology-style reports and a rule-based labeller (``reports``), a pluggable report generator
(``generator``), the report-conditioned manipulator (``manipulator``), explanation maps and
baselines (``explain``), faithfulness metrics (``metrics``) and the demo pipeline (``pipeline``).
"""

__version__ = "0.1.0"
