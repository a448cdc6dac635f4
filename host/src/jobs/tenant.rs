//! Tenants (issue #22): every job and asset is owned by the API key (its configured name)
//! that created it; a user key sees only what it owns, an admin key and a service without
//! keys see everything. An object another tenant owns is answered exactly like one that
//! does not exist, so its existence is not revealed.
//!
//! Owns the one rule of who sees what ([`Viewer::sees`]). Must never decide from anything
//! but the key's name (never a header the caller chooses, never a job's contents).

/// Who is asking, as far as ownership goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    /// No keys configured, or an admin key: every job and asset.
    Everyone,
    /// A user key: what its name owns, only.
    Tenant(String),
}

impl Viewer {
    /// Whether an object owned by `owner` (`None`: made while no keys were configured) is
    /// visible.
    pub fn sees(&self, owner: Option<&str>) -> bool {
        match self {
            Viewer::Everyone => true,
            Viewer::Tenant(name) => owner == Some(name.as_str()),
        }
    }

    /// The tenant a listing is restricted to (`None`: all).
    pub fn only(&self) -> Option<&str> {
        match self {
            Viewer::Everyone => None,
            Viewer::Tenant(name) => Some(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_sees_its_own_objects_only_and_everyone_sees_all() {
        let alice = Viewer::Tenant("alice".into());
        assert!(alice.sees(Some("alice")));
        assert!(!alice.sees(Some("bob")));
        assert!(!alice.sees(None), "objects made before keys were configured are the admin's");
        assert!(Viewer::Everyone.sees(Some("bob")) && Viewer::Everyone.sees(None));
    }
}
