"""Reading a store back: the scale-trend summary and its decision rules (summary), judge agreement
(judgements), capability cost (cost), the circuit stages' summaries (circuits), and the compiled report
with its figures (report, report_stages, report_select, report_circuits). Nothing here loads a model."""
