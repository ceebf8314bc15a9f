"""Training: the loop shared by teachers and student (`engine`) and the single-task objectives it runs."""
