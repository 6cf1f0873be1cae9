"""Tasks: data, prompts, metrics. Each task object validates its inputs on construction (before any model)."""
