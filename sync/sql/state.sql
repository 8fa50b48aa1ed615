-- The tool's own state, kept in the target in schema _sync. Created on first use, idempotently.
-- No grants to the API roles: PostgREST must never expose it (new public tables may be auto-granted;
-- _sync is not public, and PUBLIC is revoked explicitly).

CREATE SCHEMA IF NOT EXISTS _sync;
REVOKE ALL ON SCHEMA _sync FROM PUBLIC;

CREATE TABLE IF NOT EXISTS _sync.schema_version (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- One row per `sync run`. high_water is the source's clock when the run started: the next catch-up
-- reads from there (minus an overlap), never from target data. snapshot_xmin is the 64-bit xmin of
-- the source snapshot the run read with: the next catch-up also reads every row version newer than it.
CREATE TABLE IF NOT EXISTS _sync.runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    status      text NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'succeeded', 'quarantined', 'failed', 'interrupted')),
    since       timestamptz,
    high_water  timestamptz,
    options     jsonb NOT NULL DEFAULT '{}',
    counts      jsonb NOT NULL DEFAULT '{}'
);

-- Per run and table: the last primary key copied (committed in the same transaction as the rows).
CREATE TABLE IF NOT EXISTS _sync.checkpoints (
    run_id     bigint NOT NULL REFERENCES _sync.runs (id) ON DELETE CASCADE,
    table_name text NOT NULL,
    last_key   jsonb,
    rows_done  bigint NOT NULL DEFAULT 0,
    done       boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, table_name)
);

-- Source key -> target key, for users matched by e-mail and rows whose integer key was taken.
-- Keys are stored as text (uuid and integer keys alike) and cast back in joins.
CREATE TABLE IF NOT EXISTS _sync.id_map (
    table_name text NOT NULL,
    source_key text NOT NULL,
    target_key text NOT NULL,
    reason     text NOT NULL,
    run_id     bigint,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, source_key)
);
CREATE INDEX IF NOT EXISTS id_map_target_idx ON _sync.id_map (table_name, target_key);

-- Rows the target refused, with the database's own message, until they land.
CREATE TABLE IF NOT EXISTS _sync.quarantine (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      bigint,
    table_name  text NOT NULL,
    source_key  text NOT NULL,
    row_data    jsonb NOT NULL,
    error       text NOT NULL,
    sqlstate    text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS quarantine_open_idx
    ON _sync.quarantine (table_name, source_key) WHERE resolved_at IS NULL;

-- Per Storage object: what landed on the target (sizes, both sides' eTags, the bytes' digests), so a
-- rerun or catch-up skips it, and a run killed mid-way does not send again what had landed. Written by
-- the tool after the Storage API accepted the object; storage.* itself is only ever written by the API.
CREATE TABLE IF NOT EXISTS _sync.storage_objects (
    bucket      text NOT NULL,
    target_path text NOT NULL,
    source_path text NOT NULL,
    source_etag text,
    size        bigint NOT NULL,
    target_etag text,
    md5         text NOT NULL,
    sha256      text NOT NULL,
    run_id      bigint,
    landed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bucket, target_path)
);
ALTER TABLE _sync.runs ADD COLUMN IF NOT EXISTS snapshot_xmin bigint;
-- The whole source snapshot (pg_current_snapshot() as text) the run first read with: which
-- transactions at or above its xmin it saw already, so the next catch-up does not read them again.
ALTER TABLE _sync.runs ADD COLUMN IF NOT EXISTS snapshot text;
-- Written when a run ends with every read in one source snapshot: that snapshot, and per table the
-- source's row count in it and the production deletes it left on the target. The next run proves no
-- production delete happened since (every row that snapshot saw is still there) by counting, instead
-- of comparing keys.
ALTER TABLE _sync.runs ADD COLUMN IF NOT EXISTS deletes_basis jsonb;

-- Bumped by every run that takes the run lock: a run whose lock connection died takes the lock again
-- only if nobody took it in between (the value is still its own). A row, not a sequence: a sequence
-- read back after a crash or failover may have jumped ahead.
CREATE TABLE IF NOT EXISTS _sync.lock_epoch (
    one   boolean PRIMARY KEY DEFAULT true CHECK (one),
    epoch bigint NOT NULL DEFAULT 0
);
INSERT INTO _sync.lock_epoch DEFAULT VALUES ON CONFLICT DO NOTHING;
-- The ledger: every row a run landed (source key -> target key, whatever the key strategy), written
-- in the transaction that wrote the row. A later run recognises the row by it whatever its columns
-- became, and a landed row that production no longer has is a production delete.
CREATE TABLE IF NOT EXISTS _sync.landed (
    table_name text NOT NULL,
    source_key text NOT NULL,
    target_key text NOT NULL,
    run_id     bigint,
    landed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, source_key)
);
-- Found by target key through the primary key when the row kept its key (nearly every entry: an
-- index of them all cost as much again as the primary key on every write), else through this index,
-- which holds only the entries whose key changed.
DROP INDEX IF EXISTS _sync.landed_target_idx;
CREATE INDEX IF NOT EXISTS landed_moved_idx ON _sync.landed (table_name, target_key)
    WHERE target_key <> source_key;

INSERT INTO _sync.schema_version (version) VALUES (1), (2), (3), (4), (5), (6) ON CONFLICT DO NOTHING;
