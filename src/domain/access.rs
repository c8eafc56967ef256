//! Who may do what: the scopes an API key holds, and the actors and actions the audit
//! log records.

use std::{fmt, str::FromStr};

/// What an API key may do. `admin` implies every other scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Read jobs, batches, items, attempts, failures and invitations.
    BatchesRead,
    /// Put jobs; create, preview, retry and cancel batches.
    BatchesWrite,
    /// Redeem and complete invitations (the interview app).
    InvitationsRedeem,
    /// Revoke and extend invitations.
    InvitationsWrite,
    /// Queue and task routes, suppressions, webhooks, erasure, the audit log.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::BatchesRead,
        Scope::BatchesWrite,
        Scope::InvitationsRedeem,
        Scope::InvitationsWrite,
        Scope::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::BatchesRead => "batches:read",
            Scope::BatchesWrite => "batches:write",
            Scope::InvitationsRedeem => "invitations:redeem",
            Scope::InvitationsWrite => "invitations:write",
            Scope::Admin => "admin",
        }
    }

    /// True when a key holding `held` may use a route that needs `self`.
    pub fn is_granted_by(self, held: &[Scope]) -> bool {
        held.iter().any(|s| *s == self || *s == Scope::Admin)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        one_of(&Scope::ALL, Scope::as_str, s, "scope")
    }
}

/// The member of `all` that `name` prints as `s`, or an error listing them.
fn one_of<T: Copy>(
    all: &[T],
    name: fn(T) -> &'static str,
    s: &str,
    what: &str,
) -> Result<T, String> {
    all.iter().copied().find(|t| name(*t) == s).ok_or_else(|| {
        let known: Vec<&str> = all.iter().map(|t| name(*t)).collect();
        format!("unknown {what} {s:?} (one of {})", known.join(", "))
    })
}

/// Who made a change, as the audit log records it: `key:<name>` (an API key),
/// `operator:<name>` (a console user), `cli:<os user>` or `worker:<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(String);

impl Actor {
    /// The API key named `name` (its name, never the key).
    pub fn key(name: &str) -> Self {
        Actor(format!("key:{name}"))
    }
    /// An operator signed in to the console.
    pub fn operator(name: &str) -> Self {
        Actor(format!("operator:{name}"))
    }
    /// The operator CLI, run by the operating-system user `user`.
    pub fn cli(user: &str) -> Self {
        Actor(format!("cli:{user}"))
    }
    /// A worker process acting on its own (e.g. disabling an endpoint that answered
    /// 410 Gone), by the name the attempt history gives it.
    pub fn worker(name: &str) -> Self {
        Actor(format!("worker:{name}"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! audit_actions {
    ($($(#[$doc:meta])* $variant:ident = $text:literal),+ $(,)?) => {
        /// A change the audit log records: every change a caller makes, none of the
        /// queue's own progress (sends, retries after a transient failure).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum AuditAction {
            $($(#[$doc])* $variant),+
        }

        impl AuditAction {
            pub const ALL: &'static [AuditAction] = &[$(AuditAction::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(AuditAction::$variant => $text),+
                }
            }
        }
    };
}

audit_actions! {
    /// `PUT /v1/jobs/{id}` created the job.
    JobCreated = "job.created",
    /// `PUT /v1/jobs/{id}` changed an existing job (its title or status).
    JobUpdated = "job.updated",
    BatchCreated = "batch.created",
    BatchRetried = "batch.retried",
    BatchCancelled = "batch.cancelled",
    InvitationRedeemed = "invitation.redeemed",
    InvitationCompleted = "invitation.completed",
    InvitationRevoked = "invitation.revoked",
    SuppressionDeleted = "suppression.deleted",
    /// Dead queue tasks were made runnable again.
    TasksRetried = "tasks.retried",
    OperatorAdded = "operator.added",
    OperatorRemoved = "operator.removed",
    /// `DELETE /v1/candidates/{id}` erased a candidate's email and name.
    CandidateErased = "candidate.erased",
    WebhookCreated = "webhook.created",
    WebhookDeleted = "webhook.deleted",
    WebhookSecretRotated = "webhook.secret_rotated",
    /// A delivery was queued again on request.
    WebhookDeliveryReplayed = "webhook.delivery_replayed",
    /// The endpoint answered 410 Gone: no more events go to it.
    WebhookDisabled = "webhook.disabled",
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuditAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        one_of(AuditAction::ALL, AuditAction::as_str, s, "action")
    }
}

crate::domain::states::string_enum! {
    /// What a console user may do: a `viewer` sees everything with addresses masked; an
    /// `operator` also retries, cancels and re-enqueues, and sees full addresses.
    OperatorRole {
        Viewer = "viewer",
        Operator = "operator",
    }
}

/// An operator's name: 1 to 64 letters, digits and `.`, `_`, `@`, `-`, starting with a
/// letter or digit (the operators table checks the same).
pub fn check_operator_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'));
    if first_ok && rest_ok && name.len() <= 64 {
        Ok(())
    } else {
        Err(format!(
            "operator name {name:?}: 1 to 64 letters, digits, '.', '_', '@' or '-', \
             starting with a letter or digit"
        ))
    }
}

/// The PHC string (`$argon2id$v=19$…`) of `password` under a fresh random salt: what
/// the operators table stores, and what a sign-in checks with [`verify_password`].
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("could not hash the password: {e}"))
}

/// True when `password` is the one `phc` (from [`hash_password`]) was made from.
pub fn verify_password(password: &str, phc: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc).is_ok_and(|parsed| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_hash_is_argon2id_salted_and_verifies_only_its_password() {
        let a = hash_password("correct horse battery staple").expect("hashes");
        let b = hash_password("correct horse battery staple").expect("hashes");
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "each hash has its own salt");
        assert!(verify_password("correct horse battery staple", &a));
        assert!(!verify_password("correct horse battery stapler", &a));
        assert!(!verify_password("anything", "not a hash"));
    }

    #[test]
    fn admin_implies_every_scope_and_others_only_themselves() {
        for scope in Scope::ALL {
            assert!(scope.is_granted_by(&[Scope::Admin]));
            assert!(scope.is_granted_by(&[scope]));
        }
        assert!(!Scope::BatchesWrite.is_granted_by(&[Scope::BatchesRead]));
        assert!(!Scope::Admin.is_granted_by(&[Scope::BatchesWrite, Scope::BatchesRead]));
    }

    #[test]
    fn scopes_and_actions_read_back_what_they_print() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
        }
        for action in AuditAction::ALL {
            assert_eq!(action.as_str().parse::<AuditAction>(), Ok(*action));
        }
        assert!("root".parse::<Scope>().is_err());
    }
}
