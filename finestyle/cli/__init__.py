"""The `finestyle` command line: parse, call one stage function, report; exit codes 0/1/2."""
