"""The write path, in the order a request travels it.

1. `pipeline.accept` (request): the receiver authenticates, `backlog` refuses it
   while the spool is past its bound (backpressure), `portal.http.read_body`
   reads within the receiver's limit, the receiver judges, `IngestBatch.spool`
   makes the body durable, the receiver answers.
2. `telemetry.tasks.process_batch` → `pipeline.process` (worker): claim the batch,
   decompress it, the receiver stores it, mark it done: one transaction.
3. Receivers (telemetry/receivers/): one module per protocol. Those whose items are
   run events judge them with `records` and store them with `store`, which cleans
   them (`redaction`), gives them runs through the run writer (`runs.models.RunBatch`),
   COPYs them and groups their errors (`telemetry.errors`).
"""
