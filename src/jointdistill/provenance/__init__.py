"""What made an output: the code's content digest, lineage records and run records."""
