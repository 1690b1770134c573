//! The exchange tree: every Node with an InternalIP, ordered by a hash of
//! its name, laid out as an F-ary heap (position 0 is the root, the parent
//! of position `i` is `(i - 1) / F`, its children `i * F + 1 ..= i * F + F`).
//!
//! Every agent computes the same tree from the same Node list, so no
//! election or coordination is needed; the hash spreads the roles (root,
//! inner node, leaf) over the cluster regardless of how nodes are named,
//! and a node joining or leaving moves only the nodes around its position.
//! Each node talks to at most F children and one parent, whatever the
//! cluster's size; the depth is `ceil(log_F(N))`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

/// Default fan-out (`--exchange-fanout`): 16 children per node, so 5,000
/// nodes are 4 levels deep (1 + 16 + 256 + 4,096 < 5,000 ≤ 65,536).
pub const DEFAULT_FANOUT: usize = 16;

/// A node of the tree: its name and the address its agent listens on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Peer {
    pub name: Arc<str>,
    pub ip: IpAddr,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    fanout: usize,
    /// By position.
    order: Vec<Peer>,
    position: HashMap<Arc<str>, usize>,
}

/// Where a node name falls in the order: xxh3 of the name, the name itself
/// breaking (improbable) ties, so every agent sorts identically.
fn rank(name: &str) -> (u64, &str) {
    (xxhash_rust::xxh3::xxh3_64(name.as_bytes()), name)
}

impl Tree {
    /// The tree over `nodes` (name → InternalIP); `fanout` is at least 2.
    pub fn new(nodes: &BTreeMap<Arc<str>, IpAddr>, fanout: usize) -> Tree {
        let mut order: Vec<Peer> = nodes
            .iter()
            .map(|(name, ip)| Peer {
                name: name.clone(),
                ip: *ip,
            })
            .collect();
        order.sort_by(|a, b| rank(&a.name).cmp(&rank(&b.name)));
        let position = order
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        Tree {
            fanout: fanout.max(2),
            order,
            position,
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn fanout(&self) -> usize {
        self.fanout
    }

    pub fn contains(&self, name: &str) -> bool {
        self.position.contains_key(name)
    }

    pub fn peer(&self, name: &str) -> Option<&Peer> {
        self.position.get(name).map(|i| &self.order[*i])
    }

    pub fn parent(&self, name: &str) -> Option<&Peer> {
        let i = *self.position.get(name)?;
        (i > 0).then(|| &self.order[(i - 1) / self.fanout])
    }

    pub fn children(&self, name: &str) -> &[Peer] {
        let Some(i) = self.position.get(name) else {
            return &[];
        };
        let first = (i * self.fanout + 1).min(self.order.len());
        let last = (i * self.fanout + self.fanout + 1).min(self.order.len());
        &self.order[first..last]
    }

    /// Levels below the root on the longest path (0 for one node).
    pub fn depth(&self) -> usize {
        let mut depth = 0;
        let mut i = self.order.len().saturating_sub(1);
        while i > 0 {
            i = (i - 1) / self.fanout;
            depth += 1;
        }
        depth
    }

    /// Whether `name` is `root` or below it.
    pub fn in_subtree(&self, root: &str, name: &str) -> bool {
        let (Some(&root), Some(&(mut i))) = (self.position.get(root), self.position.get(name))
        else {
            return false;
        };
        while i > root {
            i = (i - 1) / self.fanout;
        }
        i == root
    }

    /// Whom `me` asks this round, given the peers now failing: its parent
    /// (and, while that fails, each ancestor up to the first that does not:
    /// the walk-up), and its children (and, for each failing child, that
    /// child's children: the adoption, again recursively). When every
    /// ancestor up to the root fails, nobody above can relay the rest of
    /// the cluster: `me` then asks the other children of each of them for
    /// their subtrees (adopting below failing ones as well), at most F per
    /// level. Failing peers stay in the plan so their recovery is seen at
    /// the next round.
    pub fn plan(&self, me: &str, failing: &BTreeSet<Arc<str>>) -> Plan {
        let mut plan = Plan::default();
        let mut up = self.parent(me);
        while let Some(peer) = up {
            plan.parents.push(peer.clone());
            if !failing.contains(&peer.name) {
                break;
            }
            up = self.parent(&peer.name);
        }
        let adopt = |roots: &mut dyn Iterator<Item = &Peer>, out: &mut Vec<Peer>| {
            let mut stack: Vec<&Peer> = roots.collect();
            stack.reverse();
            while let Some(peer) = stack.pop() {
                out.push(peer.clone());
                if failing.contains(&peer.name) {
                    stack.extend(self.children(&peer.name).iter().rev());
                }
            }
        };
        adopt(&mut self.children(me).iter(), &mut plan.children);
        let orphaned = plan
            .parents
            .last()
            .is_some_and(|top| failing.contains(&top.name));
        if orphaned {
            for ancestor in &plan.parents {
                let mut others = self
                    .children(&ancestor.name)
                    .iter()
                    .filter(|c| !self.in_subtree(&c.name, me));
                adopt(&mut others, &mut plan.others);
            }
        }
        plan
    }
}

/// The peers one node asks in a round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Its parent first, then the ancestors it walks up to while those
    /// fail (asked for their cluster view).
    pub parents: Vec<Peer>,
    /// Its children, and the children of failing ones (asked for their
    /// subtree view).
    pub children: Vec<Peer>,
    /// While every ancestor fails: the other subtrees hanging from them
    /// (asked for their subtree view).
    pub others: Vec<Peer>,
}

impl Plan {
    pub fn len(&self) -> usize {
        self.parents.len() + self.children.len() + self.others.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn nodes(n: usize) -> BTreeMap<Arc<str>, IpAddr> {
        (0..n)
            .map(|i| {
                let ip = IpAddr::V4(Ipv4Addr::new(
                    127,
                    0,
                    (i / 250) as u8 + 1,
                    (i % 250) as u8 + 1,
                ));
                (Arc::from(format!("node-{i}")), ip)
            })
            .collect()
    }

    fn names(peers: &[Peer]) -> Vec<&str> {
        peers.iter().map(|p| &*p.name).collect()
    }

    #[test]
    fn one_node_is_its_own_root_with_nobody_to_ask() {
        let tree = Tree::new(&nodes(1), DEFAULT_FANOUT);
        assert_eq!(tree.depth(), 0);
        assert!(tree.plan("node-0", &BTreeSet::new()).is_empty());
        assert!(tree.plan("unknown", &BTreeSet::new()).is_empty());
    }

    #[test]
    fn five_thousand_nodes_are_four_levels_deep_at_fanout_16() {
        let tree = Tree::new(&nodes(5000), DEFAULT_FANOUT);
        assert_eq!(tree.depth(), 4);
        assert_eq!(Tree::new(&nodes(17), DEFAULT_FANOUT).depth(), 1);
        assert_eq!(Tree::new(&nodes(18), DEFAULT_FANOUT).depth(), 2);
    }

    #[test]
    fn a_failing_parent_is_walked_past_and_a_failing_child_adopted() {
        let tree = Tree::new(&nodes(300), 4);
        // A node three levels down: parent p, grandparent g.
        let me = &tree.order[30];
        let p = tree.parent(&me.name).unwrap().clone();
        let g = tree.parent(&p.name).unwrap().clone();
        let c = tree.children(&me.name)[1].clone();
        let failing = BTreeSet::from([p.name.clone(), c.name.clone()]);
        let plan = tree.plan(&me.name, &failing);
        assert_eq!(names(&plan.parents), [&*p.name, &*g.name]);
        let mut expected: Vec<&str> = names(tree.children(&me.name));
        expected.splice(2..2, names(tree.children(&c.name)));
        assert_eq!(names(&plan.children), expected);
    }

    proptest! {
        #[test]
        fn every_node_but_the_root_has_one_parent_that_lists_it_as_a_child(
            n in 1usize..400, fanout in 2usize..20,
        ) {
            let tree = Tree::new(&nodes(n), fanout);
            let mut roots = 0;
            for peer in &tree.order {
                match tree.parent(&peer.name) {
                    None => roots += 1,
                    Some(parent) => {
                        prop_assert!(tree.children(&parent.name).contains(peer));
                        prop_assert!(tree.in_subtree(&parent.name, &peer.name));
                    }
                }
                prop_assert!(tree.children(&peer.name).len() <= fanout);
                // Without failures a node asks at most F + 1 peers.
                prop_assert!(tree.plan(&peer.name, &BTreeSet::new()).len() <= fanout + 1);
            }
            prop_assert_eq!(roots, 1);
            let root = &tree.order[0].name;
            prop_assert!(tree.order.iter().all(|p| tree.in_subtree(root, &p.name)));
        }

        #[test]
        fn the_order_does_not_depend_on_how_the_nodes_were_listed(n in 1usize..100, seed: u64) {
            let all = nodes(n);
            let tree = Tree::new(&all, 16);
            // The same nodes inserted in another order.
            let mut shuffled: Vec<_> = all.into_iter().collect();
            shuffled.sort_by_key(|(name, _)| xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), seed));
            let again = Tree::new(&shuffled.into_iter().collect(), 16);
            prop_assert_eq!(tree, again);
        }

        #[test]
        fn with_failures_every_live_node_below_is_still_reached(
            n in 2usize..300, fanout in 2usize..8, failing_mask: u64, me_at in 0usize..300,
        ) {
            let tree = Tree::new(&nodes(n), fanout);
            let me = tree.order[me_at % n].name.clone();
            let failing: BTreeSet<Arc<str>> = tree.order.iter().enumerate()
                .filter(|(i, p)| failing_mask & (1 << (i % 64)) != 0 && p.name != me)
                .map(|(_, p)| p.name.clone())
                .collect();
            let plan = tree.plan(&me, &failing);
            // For every live node of my subtree, the live node nearest me on
            // its path up (everything between it and me fails) is asked:
            // its own plan reaches the rest.
            for peer in &tree.order {
                if peer.name == me || !tree.in_subtree(&me, &peer.name) || failing.contains(&peer.name) {
                    continue;
                }
                let mut nearest = peer.clone();
                let mut up = peer.clone();
                while let Some(parent) = tree.parent(&up.name).filter(|p| p.name != me) {
                    if !failing.contains(&parent.name) {
                        nearest = parent.clone();
                    }
                    up = parent.clone();
                }
                prop_assert!(plan.children.contains(&nearest));
            }
            // Outside my subtree: a live ancestor relays it, or, when all
            // fail, the nearest live node on its path from the topmost
            // failing ancestor is asked.
            let live_ancestor = plan.parents.last().is_some_and(|p| !failing.contains(&p.name));
            if !live_ancestor && !plan.parents.is_empty() {
                let root = &tree.order[0].name;
                for peer in &tree.order {
                    if tree.in_subtree(&me, &peer.name) || failing.contains(&peer.name) {
                        continue;
                    }
                    let mut nearest = peer.clone();
                    let mut up = peer.clone();
                    while let Some(parent) = tree.parent(&up.name) {
                        if tree.in_subtree(&parent.name, &me) {
                            break;
                        }
                        if !failing.contains(&parent.name) {
                            nearest = parent.clone();
                        }
                        up = parent.clone();
                    }
                    prop_assert!(plan.others.contains(&nearest), "{} not reached (root {root})", peer.name);
                }
            }
            // The walk-up stops at the first live ancestor (or the root).
            if let Some(last) = plan.parents.last() {
                prop_assert!(!failing.contains(&last.name) || tree.parent(&last.name).is_none());
            }
        }
    }
}
