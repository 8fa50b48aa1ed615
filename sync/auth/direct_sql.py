"""The SQL of the direct writer: the batch stage, and how each staged user becomes ``auth.users`` and
``auth.identities`` rows, id-map entries and quarantine records.

Every statement reads the batch from the two temporary stage tables; the only values it takes are bound
parameters (the run id, the ``table_name`` of users, the action a statement applies to). A staged row
meets a target table through one probe of that table's index per row (``LATERAL … LIMIT 1``, or
``ON CONFLICT`` on a unique index), so a batch costs the same however large the target's tables are and
whatever the stage's statistics say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sync.auth.columns import SENT_AT_COLUMNS, STAGED_FIELDS, TOKEN_COLUMNS, Fields
from sync.sqltext import column_list, ident

STAGE_USERS = "_sync_stage_users"
STAGE_IDENTITIES = "_sync_stage_identities"
# How a staged user is routed: one row per user in the batch.
ROUTING_FIELDS: Fields = (
    ("source_id", "uuid"),
    ("target_id", "uuid"),
    ("action", "text"),
    ("kind", "text"),
    ("email_out", "text"),
    ("phone_out", "text"),
)
STAGE_USER_FIELDS: Fields = (*ROUTING_FIELDS, *STAGED_FIELDS)

# The instance id every user of a Supabase project has.
_NIL_INSTANCE = "'00000000-0000-0000-0000-000000000000'::uuid"


def _object(column: str) -> str:
    """The stage row's JSON ``column`` when it is an object, else NULL."""
    return f"CASE WHEN jsonb_typeof(s.{ident(column)}) = 'object' THEN s.{ident(column)} END"


# SQL expressions (over the stage row ``s``) for each auth.users column of a created user.
INSERT_EXPRESSIONS: dict[str, str] = {
    "instance_id": _NIL_INSTANCE,
    "id": "s.target_id",
    # Staged with the default for a missing one (StagedUser.record).
    "aud": "s.aud",
    "role": "s.role",
    "email": "s.email_out",
    # '' rather than NULL: Auth servers before mid-2024 scanned the hash into a plain string.
    "encrypted_password": "coalesce(s.encrypted_password, '')",
    "email_confirmed_at": "s.email_confirmed_at",
    "invited_at": "s.invited_at",
    "last_sign_in_at": "s.last_sign_in_at",
    # GoTrue keeps provider/providers here; a user without them gets what a signup would have written.
    "raw_app_meta_data": "coalesce("
    + _object("raw_app_meta_data")
    + ", CASE WHEN s.email_out IS NOT NULL THEN jsonb_build_object('provider', 'email', 'providers', "
    "jsonb_build_array('email')) WHEN s.phone_out IS NOT NULL THEN jsonb_build_object('provider', 'phone', "
    "'providers', jsonb_build_array('phone')) ELSE jsonb_build_object() END)",
    "raw_user_meta_data": "coalesce(" + _object("raw_user_meta_data") + ", jsonb_build_object())",
    "is_super_admin": "s.is_super_admin",
    "created_at": "coalesce(s.created_at, now())",
    "updated_at": "coalesce(s.updated_at, s.created_at, now())",
    "phone": "s.phone_out",
    "phone_confirmed_at": "s.phone_confirmed_at",
    "email_change_confirm_status": "0",
    "banned_until": "s.banned_until",
    "is_sso_user": "coalesce(s.is_sso_user, false)",
    "deleted_at": "s.deleted_at",
    "is_anonymous": "coalesce(s.is_anonymous, false)",
    **{name: "''" for name in TOKEN_COLUMNS},
    **{name: "NULL" for name in SENT_AT_COLUMNS},
}
# Any matched user, whatever the policy: a NULL the Auth server cannot read becomes what it can (a
# target row with such a NULL, e.g. from an old import, cannot sign in at all). Values are never changed.
REPAIR_EXPRESSIONS: dict[str, str] = {
    "instance_id": f"coalesce(t.instance_id, {_NIL_INSTANCE})",
    "aud": "coalesce(t.aud, s.aud)",
    "role": "coalesce(t.role, s.role)",
    **{name: f"coalesce(t.{ident(name)}, '')" for name in TOKEN_COLUMNS},
    "email_change_confirm_status": "coalesce(t.email_change_confirm_status, 0)",
    "created_at": "coalesce(t.created_at, s.created_at, now())",
    "updated_at": "coalesce(t.updated_at, s.updated_at, t.created_at, now())",
}
# source-wins on a matched user: what production says, but never clearing what the target knows.
UPDATE_EXPRESSIONS: dict[str, str] = {
    **REPAIR_EXPRESSIONS,
    # The matching left these NULL when another user holds the address.
    "email": "coalesce(s.email_out, t.email)",
    "phone": "coalesce(s.phone_out, t.phone)",
    "encrypted_password": "coalesce(nullif(s.encrypted_password, ''), t.encrypted_password)",
    "email_confirmed_at": "coalesce(s.email_confirmed_at, t.email_confirmed_at)",
    "phone_confirmed_at": "coalesce(s.phone_confirmed_at, t.phone_confirmed_at)",
    "last_sign_in_at": "greatest(s.last_sign_in_at, t.last_sign_in_at)",
    "raw_app_meta_data": "coalesce(" + _object("raw_app_meta_data") + ", t.raw_app_meta_data)",
    # A user who signed up again on the target keeps its own id as ``sub``, not production's.
    "raw_user_meta_data": "coalesce(CASE WHEN s.target_id <> s.source_id AND "
    + _object("raw_user_meta_data")
    + " ->> 'sub' = s.source_id::text THEN jsonb_set(s.raw_user_meta_data, ARRAY['sub'], "
    "to_jsonb(s.target_id::text)) ELSE " + _object("raw_user_meta_data") + " END, t.raw_user_meta_data)",
    "banned_until": "s.banned_until",
    "deleted_at": "s.deleted_at",
    "is_anonymous": "coalesce(s.is_anonymous, t.is_anonymous)",
    "updated_at": "coalesce(greatest(t.updated_at, s.updated_at), t.created_at, now())",
}
# Fixing up a user the admin API just created: every column as a direct insert would have written it,
# except the keys and what the API already normalised.
RESTORE_EXPRESSIONS: dict[str, str] = {
    c: e for c, e in INSERT_EXPRESSIONS.items() if c not in {"id", "instance_id", "email", "phone"}
}

# A source identity's ``identity_data`` (over ``i``) as it is written: its e-mail lower-cased, as the Auth
# server stores it; a missing object as one holding the subject.
IDENTITY_DATA = """CASE WHEN jsonb_typeof(i.identity_data -> 'email') = 'string'
         THEN jsonb_set(i.identity_data, ARRAY['email'], to_jsonb(lower(i.identity_data ->> 'email')))
         WHEN jsonb_typeof(i.identity_data) = 'object' THEN i.identity_data
         ELSE jsonb_build_object('sub', i.provider_id) END"""

# The source identities of the batch, as they will be written: user id, provider_id and sub follow a
# remapped user; identity_data's e-mail is lower-cased, as the Auth server stores it.
_INCOMING_IDENTITIES = f"""(
    SELECT i.id AS source_identity_id, u.source_id, u.target_id, u.action, i.provider,
           CASE WHEN i.provider IN ('email', 'phone') AND i.provider_id = u.source_id::text
                THEN u.target_id::text ELSE i.provider_id END AS provider_id,
           CASE WHEN i.provider IN ('email', 'phone') AND u.target_id <> u.source_id
                     AND d.data ->> 'sub' = u.source_id::text
                THEN jsonb_set(d.data, ARRAY['sub'], to_jsonb(u.target_id::text)) ELSE d.data END AS data,
           i.last_sign_in_at,
           coalesce(i.created_at, u.created_at, now()) AS created_at,
           coalesce(i.updated_at, i.created_at, u.created_at, now()) AS updated_at
    FROM _sync_stage_identities AS i
    JOIN _sync_stage_users AS u ON u.source_id = i.user_id
    CROSS JOIN LATERAL (SELECT {IDENTITY_DATA} AS data) AS d
) AS n"""

# A (provider_id, provider) the target already has is skipped: one probe of its unique index per identity
# (``IDENTITY_KEY_INDEXED`` checks it is there), never a scan of the whole table. The probe comes first,
# so that an identity the target has (every one of a user matched again) costs nothing more; ON CONFLICT
# still skips one written since.
INSERT_IDENTITIES = f"""
INSERT INTO auth.identities (id, provider_id, user_id, identity_data, provider, last_sign_in_at,
                             created_at, updated_at)
SELECT CASE WHEN n.source_identity_id IS NULL OR x.taken THEN gen_random_uuid() ELSE n.source_identity_id END,
       n.provider_id, n.target_id, n.data, n.provider, n.last_sign_in_at, n.created_at, n.updated_at
FROM {_INCOMING_IDENTITIES}
LEFT JOIN LATERAL (SELECT true AS held FROM auth.identities AS h
                   WHERE h.provider_id = n.provider_id AND h.provider = n.provider LIMIT 1) AS h ON true
LEFT JOIN LATERAL (SELECT true AS taken FROM auth.identities AS x WHERE x.id = n.source_identity_id LIMIT 1)
     AS x ON true
WHERE h.held IS NULL
ON CONFLICT (provider_id, provider) DO NOTHING
"""

# True when the target's ``auth.identities`` has the unique (provider_id, provider) of Auth since 2023.
IDENTITY_KEY_INDEXED = """
SELECT EXISTS (
    SELECT FROM pg_index AS i
    WHERE i.indrelid = 'auth.identities'::regclass AND i.indisunique AND i.indpred IS NULL
      AND i.indexprs IS NULL AND i.indnatts = 2
      AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute AS a
           WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)) = ARRAY['provider', 'provider_id'])
"""

# The admin API wrote e-mail/phone identities with its own timestamps and minimal data: take the source's.
RESTORE_IDENTITIES = f"""
UPDATE auth.identities AS x
SET identity_data = n.data, last_sign_in_at = n.last_sign_in_at, created_at = n.created_at,
    updated_at = n.updated_at
FROM {_INCOMING_IDENTITIES}
WHERE n.action = 'restore' AND x.provider = n.provider AND x.provider_id = n.provider_id
  AND x.user_id = n.target_id
  AND ROW(x.identity_data, x.last_sign_in_at, x.created_at, x.updated_at)
      IS DISTINCT FROM ROW(n.data, n.last_sign_in_at, n.created_at, n.updated_at)
"""

# The admin API gives each user it creates an e-mail (and a phone) identity; production's user may have
# none (an account from before identities were backfilled): what production does not have goes.
DROP_UNSOURCED_IDENTITIES = """
DELETE FROM auth.identities AS x
USING _sync_stage_users AS u
WHERE u.action = 'restore' AND x.user_id = u.target_id AND x.provider IN ('email', 'phone')
  AND x.provider_id = u.target_id::text
  AND NOT EXISTS (SELECT FROM _sync_stage_identities AS i
                  WHERE i.user_id = u.source_id AND i.provider = x.provider)
"""

# $1: the run id, $2: the ``table_name`` of users; the statements below take that name as $1.
MAP_IDS = """
INSERT INTO _sync.id_map (table_name, source_key, target_key, reason, run_id)
SELECT $2::text, s.source_id::text, s.target_id::text, s.kind, $1
FROM _sync_stage_users AS s
WHERE s.kind IN ('email', 'phone')
ON CONFLICT (table_name, source_key) DO UPDATE
SET target_key = EXCLUDED.target_key, reason = EXCLUDED.reason, run_id = EXCLUDED.run_id
WHERE _sync.id_map.target_key IS DISTINCT FROM EXCLUDED.target_key
"""

# The ledger: every production user this batch wrote or found, with its target user ($1: run id,
# $2: the ``table_name`` of users), so that a later run knows the target user came from production.
# Entries go in in the ledger key's order (``ORDER BY 2``): its index is then written a page at a time
# rather than at random places, which at some 400k entries costs half as much.
_LEDGER_CONFLICT = """
ON CONFLICT (table_name, source_key) DO UPDATE
SET target_key = EXCLUDED.target_key, run_id = EXCLUDED.run_id
WHERE _sync.landed.target_key IS DISTINCT FROM EXCLUDED.target_key
"""
LAND_USERS = f"""
INSERT INTO _sync.landed (table_name, source_key, target_key, run_id)
SELECT $2::text, s.source_id::text, s.target_id::text, $1
FROM _sync_stage_users AS s
CROSS JOIN LATERAL (SELECT FROM auth.users AS t WHERE t.id = s.target_id LIMIT 1) AS t
ORDER BY 2
{_LEDGER_CONFLICT}"""
# The same for users just created under their own id ($3: their ids): a plain insert, as no run can have
# landed a user the target did not have (an entry left by a user deleted on the target since makes the
# statement fail, and the users go through the batches, which update it).
LAND_CREATED = """
INSERT INTO _sync.landed (table_name, source_key, target_key, run_id)
SELECT $2::text, k::text, k::text, $1 FROM unnest($3::uuid[]) AS k ORDER BY 2
"""

# A user now found by id no longer needs (and must not keep) an older mapping. This statement and the
# next find their rows by one probe of a unique index per staged user (``= ANY`` of the staged keys),
# however many rows those tables hold and whatever the stage's statistics say.
UNMAP_IDS = """
DELETE FROM _sync.id_map AS m
WHERE m.table_name = $1
  AND m.source_key = ANY (ARRAY(SELECT source_id::text FROM _sync_stage_users WHERE kind IN ('id', 'new')))
"""

RESOLVE_QUARANTINE = """
UPDATE _sync.quarantine AS q SET resolved_at = now()
WHERE q.table_name = $1 AND q.resolved_at IS NULL
  AND q.source_key = ANY (ARRAY(SELECT source_id::text FROM _sync_stage_users))
"""

# The same for users given by id ($2).
RESOLVE_CREATED = """
UPDATE _sync.quarantine SET resolved_at = now()
WHERE table_name = $1 AND resolved_at IS NULL AND source_key = ANY ($2::uuid[]::text[])
"""

MISSING_USERS = """
SELECT s.source_id FROM _sync_stage_users AS s
LEFT JOIN LATERAL (SELECT true AS found FROM auth.users AS t WHERE t.id = s.target_id LIMIT 1) AS t ON true
WHERE t.found IS NULL
"""

# $1: the run id, $2: the ``table_name`` of users.
QUARANTINE = """
INSERT INTO _sync.quarantine (run_id, table_name, source_key, row_data, error, sqlstate)
VALUES ($1, $2, $3, $4::jsonb, $5, $6)
ON CONFLICT (table_name, source_key) WHERE resolved_at IS NULL DO UPDATE
SET run_id = EXCLUDED.run_id, row_data = EXCLUDED.row_data, error = EXCLUDED.error,
    sqlstate = EXCLUDED.sqlstate, created_at = now()
"""


def create_stage_sql(name: str, fields: Sequence[tuple[str, str]]) -> str:
    """``CREATE TEMP TABLE`` for a stage that lives as long as the connection and is emptied when each
    batch's transaction ends (its statistics stay)."""
    columns = ", ".join(f"{ident(n)} {t}" for n, t in fields)
    return f"CREATE TEMP TABLE {ident(name)} ({columns}) ON COMMIT DELETE ROWS"


def insert_users_sql(columns: set[str]) -> str:
    """``INSERT INTO auth.users`` of the ``create`` rows, naming only the target's own ``columns``."""
    names = [c for c in INSERT_EXPRESSIONS if c in columns]
    values = ", ".join(INSERT_EXPRESSIONS[c] for c in names)
    return (
        f"INSERT INTO auth.users ({column_list(names)}) SELECT {values} "
        "FROM _sync_stage_users AS s WHERE s.action = 'create'"
    )


def set_users_sql(expressions: Mapping[str, str], columns: set[str]) -> str:
    """``UPDATE auth.users … FROM`` the stage for the rows whose action is ``$1``, touching only rows
    where one of ``expressions`` (those of the target's ``columns``) changes a value; returns their
    source ids."""
    names = [c for c in expressions if c in columns]
    values = ", ".join(expressions[c] for c in names)
    # The users are found by their primary key, one probe each: ``= ANY`` of the staged ids keeps the
    # planner from hashing the stage against a scan of every target user.
    return (
        f"UPDATE auth.users AS t SET ({column_list(names)}) = ROW({values}) FROM _sync_stage_users AS s "
        "WHERE t.id = ANY (ARRAY(SELECT target_id FROM _sync_stage_users WHERE action = $1)) "
        f"AND t.id = s.target_id AND s.action = $1 AND ROW({column_list(names, 't.')}) "
        f"IS DISTINCT FROM ROW({values}) RETURNING s.source_id"
    )
