"""Reference models, metrics, gate, downstream, report (installed as ``synthct.eval``)."""
