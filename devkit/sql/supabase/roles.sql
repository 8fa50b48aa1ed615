-- Cluster-wide roles of a Supabase project, as hosted Supabase has them.
--
-- Run by the cluster's superuser `supabase_admin` (created by initdb), once per cluster, and again
-- whenever the roles may have drifted: every statement is idempotent. Roles are created only when
-- missing, then their attributes, passwords and memberships are (re)asserted, so a re-run converges
-- on the shape below instead of failing.
--
-- The point of this file is the `postgres` login: on a hosted project it is NOT a superuser. It is
-- NOSUPERUSER with CREATEDB, CREATEROLE, REPLICATION and BYPASSRLS, and a member of the API roles
-- and of pg_read_all_data, pg_monitor and pg_signal_backend. Anything that works here as `postgres`
-- must therefore also work on a hosted project, and anything that needs a superuser fails here too.

DO $roles$
BEGIN
    -- Demoting the role this script runs as would lock the cluster out of its own superuser.
    IF current_user = 'postgres' THEN
        RAISE EXCEPTION 'roles.sql must run as the superuser supabase_admin, not as postgres';
    END IF;

    -- The API roles PostgREST switches to. They never log in; `authenticator` becomes them.
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN
        CREATE ROLE anon NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
        CREATE ROLE authenticated NOLOGIN NOINHERIT;
    END IF;
    -- service_role is the "secret key" role: it bypasses row level security.
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'service_role') THEN
        CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
    END IF;

    -- The Auth server's login: owner of the auth tables and functions.
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'supabase_auth_admin') THEN
        CREATE ROLE supabase_auth_admin LOGIN NOINHERIT CREATEROLE PASSWORD 'supabase_auth_admin';
    END IF;

    -- The Storage server's login: owner of the storage tables.
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'supabase_storage_admin') THEN
        CREATE ROLE supabase_storage_admin LOGIN NOINHERIT CREATEROLE PASSWORD 'supabase_storage_admin';
    END IF;

    -- PostgREST's login; it holds no privileges itself and switches to an API role per request.
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticator') THEN
        CREATE ROLE authenticator LOGIN NOINHERIT PASSWORD 'authenticator';
    END IF;

    -- The dashboard's role (no login of its own on hosted).
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dashboard_user') THEN
        CREATE ROLE dashboard_user NOLOGIN CREATEDB CREATEROLE REPLICATION;
    END IF;

    -- The project owner's login, the one users paste into tools.
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'postgres') THEN
        CREATE ROLE postgres LOGIN PASSWORD 'postgres';
    END IF;
END
$roles$;

-- Re-assert the attributes every time, so a role created earlier with other settings converges.
ALTER ROLE anon NOLOGIN NOINHERIT;
ALTER ROLE authenticated NOLOGIN NOINHERIT;
ALTER ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
ALTER ROLE supabase_auth_admin LOGIN NOINHERIT CREATEROLE PASSWORD 'supabase_auth_admin';
ALTER ROLE supabase_storage_admin LOGIN NOINHERIT CREATEROLE PASSWORD 'supabase_storage_admin';
ALTER ROLE authenticator LOGIN NOINHERIT PASSWORD 'authenticator';
ALTER ROLE postgres
    LOGIN INHERIT NOSUPERUSER CREATEDB CREATEROLE REPLICATION BYPASSRLS PASSWORD 'postgres';

-- Role settings as on hosted. They apply at login only (not after SET ROLE).
ALTER ROLE supabase_auth_admin SET search_path = auth;
ALTER ROLE supabase_auth_admin SET idle_in_transaction_session_timeout = '60s';
ALTER ROLE supabase_storage_admin SET search_path = storage;
ALTER ROLE anon SET statement_timeout = '3s';
ALTER ROLE authenticated SET statement_timeout = '8s';
ALTER ROLE authenticator SET statement_timeout = '8s';
ALTER ROLE postgres SET search_path = "$user", public, extensions;

-- Memberships, granted only when missing (or when the admin option is missing), so a re-run is
-- silent:
--   * PostgREST's login may become any API role;
--   * `postgres` holds the API roles WITH ADMIN OPTION (hosted re-grants them that way since PG 16,
--     where CREATEROLE alone no longer gives control over other roles), and the predefined roles
--     that stand in for superuser powers: read everything, monitor, cancel other backends;
--   * pg_create_subscription exists from PG 16 on; hosted grants it there.
DO $memberships$
DECLARE
    grant_row record;
BEGIN
    FOR grant_row IN
        SELECT *
        FROM (VALUES
            ('anon',                   'authenticator', false),
            ('authenticated',          'authenticator', false),
            ('service_role',           'authenticator', false),
            ('anon',                   'postgres',      true),
            ('authenticated',          'postgres',      true),
            ('service_role',           'postgres',      true),
            ('pg_read_all_data',       'postgres',      true),
            ('pg_monitor',             'postgres',      false),
            ('pg_signal_backend',      'postgres',      false),
            ('pg_create_subscription', 'postgres',      false)
        ) AS wanted (granted_role, member, with_admin)
        WHERE EXISTS (SELECT FROM pg_roles WHERE rolname = wanted.granted_role)
          AND NOT EXISTS (
              SELECT
              FROM pg_auth_members AS m
              JOIN pg_roles AS g ON g.oid = m.roleid
              JOIN pg_roles AS u ON u.oid = m.member
              WHERE g.rolname = wanted.granted_role
                AND u.rolname = wanted.member
                AND (m.admin_option OR NOT wanted.with_admin)
          )
    LOOP
        EXECUTE format(
            'GRANT %I TO %I%s',
            grant_row.granted_role,
            grant_row.member,
            CASE WHEN grant_row.with_admin THEN ' WITH ADMIN OPTION' ELSE '' END
        );
    END LOOP;
END
$memberships$;
