"""GLUE metrics as an ``evaluate`` module shipped in the package, so ``evaluate.load`` finds it offline (the hub
copy of evaluate's "glue" metric is a script fetched at run time). It follows GLUE's definitions and computes
them with scikit-learn and SciPy: Matthews correlation (CoLA), Pearson and Spearman (STS-B), accuracy and F1
(MRPC, QQP), accuracy (the rest)."""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

SUBSETS = ("cola", "sst2", "mrpc", "stsb", "qnli", "rte", "qqp", "mnli", "mnli_matched", "mnli_mismatched", "wnli")


class GlueMetric(evaluate.Metric):
    def _info(self):
        if self.config_name not in SUBSETS:
            raise KeyError(f"unknown GLUE subset '{self.config_name}'; one of {SUBSETS}")
        value = datasets.Value("float32" if self.config_name == "stsb" else "int64")
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description="predictions, references",
                                   features=datasets.Features({"predictions": value, "references": value}))

    def _compute(self, predictions, references):
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if self.config_name == "stsb":
            return {"pearson": float(pearsonr(predictions, references)[0]),
                    "spearmanr": float(spearmanr(predictions, references)[0])}
        scores = {"accuracy": float(accuracy_score(references, predictions))}
        if self.config_name in ("mrpc", "qqp"):
            scores["f1"] = float(f1_score(references, predictions))
        return scores
