//! What removing restore points means for one disk's image chains.
//!
//! A restore point's image of a disk is a full or an overlay on its
//! parent's image. Removing a restore point that a kept one builds on
//! would orphan it, so instead the kept one is **merged**: a new image of
//! it is written whose contents are its own over every removed ancestor
//! down to the nearest kept one, backed by that kept ancestor (or by
//! nothing: a synthetic full). Only then are removed images deleted.

use std::collections::{HashMap, HashSet};

/// One completed image of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Its backup.
    pub backup_id: String,
    /// The backup whose image it is an overlay on.
    pub parent: Option<String>,
}

/// Rewrite `into` without the removed layers under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    /// The kept restore point whose image is rewritten.
    pub into: String,
    /// Removed ancestors folded into it, nearest first.
    pub drop: Vec<String>,
    /// Its new parent: the nearest kept ancestor (`None`: a synthetic full).
    pub new_parent: Option<String>,
}

/// Merges to run (in order), then images to delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainPlan {
    /// Merges, each independent of the others' results (every merge reads
    /// only old images, which stay until all merges are done).
    pub merges: Vec<Merge>,
    /// Images of removed restore points, deleted once every merge that
    /// reads them is committed.
    pub deletes: Vec<String>,
}

/// Why a chain cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// An image names a parent that is not among the images.
    #[error("image of {child} names parent {parent}, which has no image")]
    MissingParent {
        /// The image.
        child: String,
        /// Its parent.
        parent: String,
    },
    /// Parents loop.
    #[error("the chain through {0} loops")]
    Loop(String),
}

/// Plan the removal of every image not in `keep`.
pub fn plan(images: &[Image], keep: &HashSet<String>) -> Result<ChainPlan, ChainError> {
    let parent: HashMap<&str, Option<&str>> = images
        .iter()
        .map(|i| (i.backup_id.as_str(), i.parent.as_deref()))
        .collect();
    for i in images {
        if let Some(p) = &i.parent {
            if !parent.contains_key(p.as_str()) {
                return Err(ChainError::MissingParent {
                    child: i.backup_id.clone(),
                    parent: p.clone(),
                });
            }
        }
    }
    let mut plan = ChainPlan::default();
    for i in images {
        if !keep.contains(&i.backup_id) {
            plan.deletes.push(i.backup_id.clone());
            continue;
        }
        let mut drop = Vec::new();
        let mut cur = i.parent.as_deref();
        let mut steps = 0usize;
        let new_parent = loop {
            let Some(p) = cur else { break None };
            if keep.contains(p) {
                break Some(p.to_owned());
            }
            steps += 1;
            if steps > images.len() {
                return Err(ChainError::Loop(i.backup_id.clone()));
            }
            drop.push(p.to_owned());
            cur = parent.get(p).copied().flatten();
        };
        if !drop.is_empty() {
            plan.merges.push(Merge {
                into: i.backup_id.clone(),
                drop,
                new_parent,
            });
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(ids: &[&str]) -> Vec<Image> {
        ids.iter()
            .enumerate()
            .map(|(n, id)| Image {
                backup_id: (*id).into(),
                parent: (n > 0).then(|| ids[n - 1].to_owned()),
            })
            .collect()
    }

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn removing_the_full_makes_the_next_one_a_synthetic_full() {
        let p = plan(&chain(&["F", "I1", "I2"]), &set(&["I1", "I2"])).unwrap();
        assert_eq!(
            p.merges,
            [Merge {
                into: "I1".into(),
                drop: vec!["F".into()],
                new_parent: None
            }]
        );
        assert_eq!(p.deletes, ["F"]);
    }

    #[test]
    fn a_run_of_removed_incrementals_folds_into_the_next_kept_one() {
        let p = plan(&chain(&["F", "I1", "I2", "I3", "I4"]), &set(&["F", "I3"])).unwrap();
        assert_eq!(
            p.merges,
            [Merge {
                into: "I3".into(),
                drop: vec!["I2".into(), "I1".into()],
                new_parent: Some("F".into())
            }]
        );
        // I4 depends on nothing kept above it: just deleted.
        assert_eq!(p.deletes, ["I1", "I2", "I4"]);
    }

    #[test]
    fn nothing_to_merge_when_parents_are_kept() {
        let p = plan(&chain(&["F", "I1", "I2"]), &set(&["F", "I1"])).unwrap();
        assert!(p.merges.is_empty());
        assert_eq!(p.deletes, ["I2"]);
        let p = plan(&chain(&["F", "I1"]), &set(&["F", "I1"])).unwrap();
        assert_eq!(p, ChainPlan::default());
    }

    #[test]
    fn broken_and_looping_chains_are_errors() {
        let mut c = chain(&["F", "I1"]);
        c[0].parent = Some("X".into());
        assert!(matches!(
            plan(&c, &set(&["I1"])),
            Err(ChainError::MissingParent { .. })
        ));
        let c = vec![
            Image {
                backup_id: "A".into(),
                parent: Some("B".into()),
            },
            Image {
                backup_id: "B".into(),
                parent: Some("A".into()),
            },
            Image {
                backup_id: "C".into(),
                parent: Some("A".into()),
            },
        ];
        assert!(matches!(plan(&c, &set(&["C"])), Err(ChainError::Loop(_))));
    }
}
