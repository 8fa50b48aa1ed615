-- The development database's schema work of the month, applied on top of the copy of production.

-- New enum value: production never uses it, the copy must still accept production's values.
ALTER TYPE public.request_status ADD VALUE 'under_review' AFTER 'submitted';

-- profiles: a renamed column, a NOT NULL column with a default, a nullable one.
ALTER TABLE public.profiles RENAME COLUMN full_name TO display_name;
ALTER TABLE public.profiles ADD COLUMN onboarding_step integer NOT NULL DEFAULT 0;
ALTER TABLE public.profiles ADD COLUMN avatar_url text;

-- financing_requests: new columns and a CHECK the new site relies on.
ALTER TABLE public.financing_requests ADD COLUMN risk_score numeric(5, 2);
ALTER TABLE public.financing_requests ADD COLUMN channel text NOT NULL DEFAULT 'web';
ALTER TABLE public.financing_requests
    ADD CONSTRAINT financing_requests_term_months_check CHECK (term_months BETWEEN 3 AND 60);

ALTER TABLE public.bank_profiles ADD COLUMN verified_at timestamptz;
ALTER TABLE public.documents ADD COLUMN verified boolean NOT NULL DEFAULT false;

-- A new table that references profiles.
CREATE TABLE public.notifications (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    profile_id uuid NOT NULL REFERENCES public.profiles (id) ON DELETE CASCADE,
    message    text NOT NULL,
    read_at    timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE public.notifications ENABLE ROW LEVEL SECURITY;
CREATE POLICY "own notifications" ON public.notifications FOR ALL TO authenticated
    USING (profile_id = auth.uid());

-- An RPC function the new site calls through PostgREST.
CREATE FUNCTION public.request_summary(p_profile uuid)
RETURNS TABLE (status public.request_status, requests bigint, total_amount numeric)
LANGUAGE sql STABLE SECURITY INVOKER SET search_path = '' AS $$
    SELECT r.status, count(*), sum(r.amount)
    FROM public.financing_requests AS r
    WHERE r.profile_id = p_profile
    GROUP BY r.status
$$;

-- The signup trigger follows the rename.
CREATE OR REPLACE FUNCTION public.handle_new_user() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    INSERT INTO public.profiles (id, email, display_name)
    VALUES (new.id, new.email, new.raw_user_meta_data ->> 'full_name');
    RETURN new;
END;
$$;
