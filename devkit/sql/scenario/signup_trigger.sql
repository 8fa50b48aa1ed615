-- The trigger Supabase's docs teach: every new auth user gets a profile row. SECURITY DEFINER with an
-- empty search_path, as the docs write it, so it also works when the Auth server inserts the user.
-- Created after the bulk load, so it fires only for users created from then on.
CREATE FUNCTION public.handle_new_user() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    INSERT INTO public.profiles (id, email, full_name)
    VALUES (new.id, new.email, new.raw_user_meta_data ->> 'full_name');
    RETURN new;
END;
$$;

CREATE TRIGGER on_auth_user_created
    AFTER INSERT ON auth.users
    FOR EACH ROW EXECUTE FUNCTION public.handle_new_user();
