"""The privacy floor's names: the site keys behind the minimums a number must clear before it
leaves a site, named wherever a number is withheld by them (the task check, reasons, summaries)."""

MIN_SUBJECTS_KEY = "min_report_subjects"
MIN_POSITIVES_KEY = "min_report_positives"
SMALL_CELL_RISK = "small cells re-identify patients"
