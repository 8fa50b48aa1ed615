"""Production keeps going after the first run: the changes the demo's catch-up and cutover must bring.

Sign-ups (users with their identities and profiles), new rows for people who were there before the
copy, edits with and without ``updated_at``, and an account deleted. Each is one line of the story.
"""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg

from devkit import scenario


def make_production_changes(url: str, seed: int = scenario.DEFAULT_SEED) -> list[str]:
    """Make the changes in the production database at ``url``; return one line describing each."""
    now = datetime.now(UTC)
    people = scenario.signups(3, now, seed)
    with psycopg.connect(url) as conn:
        scenario.sign_up(conn, people)
        providers = conn.execute(
            "SELECT string_agg(DISTINCT provider, ', ' ORDER BY provider) FROM auth.identities "
            "WHERE user_id = ANY(%s)",
            ([u["id"] for u in people.users],),
        ).fetchone()[0]  # type: ignore[index]
        old = [
            r[0]
            for r in conn.execute(
                "SELECT p.id FROM public.profiles AS p JOIN public.financing_requests AS r "
                "ON r.profile_id = p.id WHERE p.created_at < %s GROUP BY p.id ORDER BY p.id LIMIT 2",
                (scenario.COPY_DATE,),
            )
        ]
        requests = [
            conn.execute(
                "INSERT INTO public.financing_requests (profile_id, amount, term_months, status, purpose) "
                "VALUES (%s, 85000, 24, 'submitted', 'equipo') RETURNING id",
                (profile,),
            ).fetchone()[0]  # type: ignore[index]
            for profile in old
        ]
        conn.execute(
            "INSERT INTO public.bank_profiles (profile_id, bank_name, account_type, monthly_income) "
            "VALUES (%s, 'Banorte', 'nomina', 42000)",
            (old[0],),
        )
        approved = conn.execute(
            "UPDATE public.financing_requests SET status = 'approved', updated_at = now() WHERE id = "
            "(SELECT min(id) FROM public.financing_requests WHERE status = 'submitted') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        quiet = conn.execute(
            "UPDATE public.bank_profiles SET monthly_income = monthly_income + 2500 WHERE id = "
            "(SELECT min(id) FROM public.bank_profiles) RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        gone = conn.execute(
            "DELETE FROM auth.users WHERE id = (SELECT u.id FROM auth.users AS u WHERE u.created_at >= %s "
            "AND u.email IS NOT NULL AND NOT EXISTS (SELECT FROM public.financing_requests AS r "
            "WHERE r.profile_id = u.id) AND NOT EXISTS (SELECT FROM public.bank_profiles AS b "
            "WHERE b.profile_id = u.id) AND NOT EXISTS (SELECT FROM public.documents AS d "
            "WHERE d.profile_id = u.id) ORDER BY u.created_at LIMIT 1) RETURNING id",
            (scenario.COPY_DATE,),
        ).fetchone()[0]  # type: ignore[index]
    return [
        f"3 people signed up (identities: {providers}; the signup trigger made their profiles)",
        f"people from before the copy asked for {len(requests)} loans "
        f"(requests {', '.join(map(str, requests))}) and added a bank profile",
        f"request {approved} was approved (updated_at stamped)",
        f"bank profile {quiet} got a new monthly income, updated_at left alone",
        f"user {gone} deleted the account (its profile went with it)",
    ]
