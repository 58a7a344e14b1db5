//! Cache grants: which accounts and projects a token may read or write (auth.md).

use std::collections::HashSet;

use serde::Deserialize;

use super::{Action, Resource};

/// Read and write lists of one scope. Write implies read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct AccessLists {
    pub read: Vec<String>,
    pub write: Vec<String>,
}

/// The `cache_grants` object of auth.md, as sent by the control plane or written in a static
/// tokens file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct GrantsDoc {
    pub account: AccessLists,
    pub project: AccessLists,
}

/// Grants normalized for lookups: handles lowercased, write folded into read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    account_read: HashSet<String>,
    account_write: HashSet<String>,
    project_read: HashSet<String>,
    project_write: HashSet<String>,
}

impl From<GrantsDoc> for Grants {
    fn from(doc: GrantsDoc) -> Self {
        let lower = |items: &[String]| {
            items
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect::<HashSet<_>>()
        };
        let account_write = lower(&doc.account.write);
        let project_write = lower(&doc.project.write);
        Grants {
            account_read: lower(&doc.account.read)
                .union(&account_write)
                .cloned()
                .collect(),
            project_read: lower(&doc.project.read)
                .union(&project_write)
                .cloned()
                .collect(),
            account_write,
            project_write,
        }
    }
}

impl Grants {
    /// An account grant covers the account's own requests and all its projects; a project grant
    /// covers only requests naming that project.
    pub fn allows(&self, resource: &Resource<'_>, action: Action) -> bool {
        let (accounts, projects) = match action {
            Action::Read => (&self.account_read, &self.project_read),
            Action::Write => (&self.account_write, &self.project_write),
        };
        if accounts.contains(resource.account) {
            return true;
        }
        match resource.project {
            Some(project) => projects.contains(&format!("{}/{}", resource.account, project)),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(
        account_read: &[&str],
        account_write: &[&str],
        project_read: &[&str],
        project_write: &[&str],
    ) -> Grants {
        let list = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
        Grants::from(GrantsDoc {
            account: AccessLists {
                read: list(account_read),
                write: list(account_write),
            },
            project: AccessLists {
                read: list(project_read),
                write: list(project_write),
            },
        })
    }

    fn res<'a>(account: &'a str, project: Option<&'a str>) -> Resource<'a> {
        Resource { account, project }
    }

    #[test]
    fn account_grants_reach_projects_but_project_grants_stay_put() {
        let account = grants(&["acme"], &[], &[], &[]);
        assert!(account.allows(&res("acme", Some("ios")), Action::Read));
        assert!(account.allows(&res("acme", None), Action::Read));
        assert!(!account.allows(&res("acme", None), Action::Write));
        assert!(!account.allows(&res("other", None), Action::Read));

        let project = grants(&[], &[], &[], &["ACME/ios"]);
        assert!(project.allows(&res("acme", Some("ios")), Action::Write));
        assert!(
            project.allows(&res("acme", Some("ios")), Action::Read),
            "write implies read"
        );
        assert!(!project.allows(&res("acme", Some("android")), Action::Read));
        assert!(!project.allows(&res("acme", None), Action::Read));
    }
}
