from tydust_gen.cli import app

app(prog_name="tydust-gen")
