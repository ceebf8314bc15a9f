from jointdistill.cli import app

app(prog_name="jointdistill")
