"""gMAD: pair search over a scored corpus (more to come: sheets, the study, the analysis)."""
