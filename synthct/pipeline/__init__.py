"""The pipeline layer: stages that take and return artifacts (manifests, generator folders,
cohorts, gate reports, results) by combining the core, the metrics and the Flower apps; the
command line and the demo call these."""
