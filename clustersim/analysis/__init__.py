"""Analysis over plans and results: audit findings, reports, comparisons."""
