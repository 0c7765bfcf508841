"""Analysis of results: tables and statistics (``tables``), figures (``plots``), the HTML report (``report``) and
the comparison of two runs (``compare``)."""
