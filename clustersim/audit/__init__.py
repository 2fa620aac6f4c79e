"""Static verdicts: the audit's checks and findings, judging targets and claims, fixes, plan
differences, the review document."""
