"""Studies: tuned, seeded, paired comparisons of methods with confidence intervals (``python -m lilyexp.study``).

A study (``conf/study/<name>.yaml``, schema :class:`lilyexp.study.settings.StudySettings`) tunes each method's
grid on a validation split held out from the training data, selects each method's point by its mean validation
metric, reruns the chosen points over several seeds, and reports per endpoint the mean with a 95% interval, the
paired difference to a reference method per seed, pooled comparisons and a verdict that says "better" or "worse"
only when the interval excludes zero. Every cell it runs is an ordinary runner cell with its own record.
"""
