"""Reading a store back: the scale-trend summary and its decision rules (summary), judge agreement
(judgements) and the compiled report (report, report_stages), over each stage's read side
(`refusal_ray.stages.<name>.read`: its summary columns, report section and figures). Nothing here
loads a model or torch."""
