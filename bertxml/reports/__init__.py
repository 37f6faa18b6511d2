"""What the models are worth: the Spark AUC reports (`evaluate`), the paper's model comparison (`compare`,
which trains through `bertxml.training` and measures through `bertxml.scoring`) and per-note explanations
(`explain`). The array metrics live one floor down in `bertxml.metrics`, because training selects its best
epoch on them. It may import every subpackage below it; only `bertxml.retrain`, `bertxml.demo` and
`bertxml.cli` import it."""
