"""Run the ingest flow on a JSON config file; write the manifest to OUT (benchmarks)."""

import json
import sys


def main() -> None:
    from bertflow.runtime import configure_environment, run_flow

    configure_environment()
    from flows.ingest import ingest_flow
    from tasks.ingest import IngestConfig

    config = IngestConfig.model_validate(json.loads(open(sys.argv[1]).read()))
    with open(sys.argv[2], "w") as out:
        json.dump(run_flow(ingest_flow, config=config), out)


if __name__ == "__main__":  # worker processes are spawned and re-import this file
    main()
