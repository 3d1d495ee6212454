def run(config, workdir): print("RUN", workdir)
