"""The SCROLLS metric as a local `evaluate` module, for code written against `evaluate.load`.

    metric = evaluate.load("<repo>/scrolls_ssm/scrolls_metric", "gov_report")
    metric.compute(predictions=["a summary"], references=[["the reference", "another reference"]])

The config name is the SCROLLS task. Predictions are one string per id and references a list of strings per id,
in the same order. The scoring itself is scrolls_ssm.metrics.compute_scrolls_metrics, so this module needs the
scrolls_ssm package importable (installed, or the repository on PYTHONPATH); evaluate names it as a missing
dependency otherwise. evaluate copies this file into its modules cache, which is why it imports the package
absolutely rather than relatively.
"""

import datasets
import evaluate

from scrolls_ssm.data import TASKS
from scrolls_ssm.metrics import compute_scrolls_metrics

_CITATION = """\
@inproceedings{shaham-etal-2022-scrolls,
    title = "{SCROLLS}: Standardized {C}ompa{R}ison Over Long Language Sequences",
    author = "Shaham, Uri and Segal, Elad and Ivgi, Maor and Efrat, Avia and Yoran, Ori and Haviv, Adi and
      Gupta, Ankit and Xiong, Wenhan and Geva, Mor and Berant, Jonathan and Levy, Omer",
    booktitle = "Proceedings of EMNLP 2022",
    year = "2022",
}
"""

_DESCRIPTION = "SCROLLS task metrics (ROUGE, F1 or exact match), equal to the official metric to 4 decimals."

_KWARGS_DESCRIPTION = """\
Args:
    predictions: list of strings, one per id.
    references: list of lists of strings, all references of each id.
Returns:
    rouge/rouge1, rouge/rouge2, rouge/rougeL, rouge/rougeLsum, rouge/geometric_mean (summarization tasks),
    or f1 (qasper, narrative_qa), or exact_match (quality, quality_hard, contract_nli); plus num_predicted,
    mean_prediction_length_characters and scrolls_score (None for quality_hard).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ScrollsMetric(evaluate.Metric):
    def _info(self):
        if self.config_name not in TASKS:
            raise ValueError(
                f"unknown SCROLLS task {self.config_name!r} as config name; valid: {', '.join(TASKS)}. "
                f"Fix: evaluate.load(<path>, 'gov_report') or another task name."
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            reference_urls=["https://www.scrolls-benchmark.com/", "https://arxiv.org/abs/2201.03533"],
        )

    def _compute(self, predictions, references):
        ids = [str(index) for index in range(len(predictions))]
        return compute_scrolls_metrics(
            self.config_name, dict(zip(ids, predictions, strict=True)), dict(zip(ids, references, strict=True))
        )
