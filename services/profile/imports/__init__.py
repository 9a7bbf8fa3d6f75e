"""Bulk import of customers (``POST /v1/customers:import``).

The body is NDJSON, optionally gzip-compressed, read as a stream in constant memory:

1. ``reader`` cuts the (decompressed) stream into batches of numbered lines;
2. ``parser`` validates a batch against ``CustomerImportLine`` (the PUT body plus its id) and
   turns the good lines into staging rows; bad lines become errors with their line number;
3. ``repository`` copies the rows into a temporary staging table (``COPY``) and merges them
   with set-based statements: identity conflicts (the PUT rule), merged-away ids, the
   identities, the customers (whose upsert returns their projection documents and records
   the batch's announcement row), and one ``profile.imported`` in the outbox, all in one
   transaction per batch;
4. ``pipeline`` keeps two batch transactions in flight (the next is staged and checked while
   one merges), merges and commits them in file order, retries a batch that met a
   concurrent writer, and writes each committed batch's projection to Redis in a few Lua
   calls; ``endpoints`` serves an announcement's customers to consumers.
"""
