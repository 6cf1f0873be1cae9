"""Adaptation methods: each yaml in conf/method builds one of these objects before the model is loaded
(so bad settings fail early); the runner then calls ``apply(model)``."""
