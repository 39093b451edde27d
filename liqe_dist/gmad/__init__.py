"""gMAD: the pair search over a scored corpus, the report, the study web app and its analysis."""
