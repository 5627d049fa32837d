use super::*;

const TOKENS: &str = "\
# token,user,uid,groups
alice-token-0123456789,alice,1
bob-token-0123456789ab,bob,2,\"team-b,readers\"
admin-token-0123456789,root,0,admins
";

const POLICY: &str = "
rules:
  - groups: [admins]
    verbs: [\"*\"]
    resources: [\"*\"]
    namespaces: [\"*\"]
  - users: [alice]
    verbs: [get, list, watch, apply, delete]
    resources: [workloads, workloads/log]
    namespaces: [team-a]
  - groups: [readers]
    verbs: [get, list]
    resources: [workloads]
    namespaces: [\"*\"]
";

fn auth() -> UserAuth {
    UserAuth::standalone(
        Some(TokenFile::parse(TOKENS).expect("tokens")),
        None,
        Some(Policy::parse(POLICY).expect("policy")),
    )
}

fn request(token: Option<&str>) -> tonic::Request<()> {
    let mut request = tonic::Request::new(());
    if let Some(token) = token {
        flotilla_proto::auth::insert_bearer(&mut request, token);
    }
    request
}

fn access(verb: Verb, resource: Resource, namespace: &str) -> Access<'_> {
    Access::new(verb, resource, namespace, "x")
}

#[tokio::test]
async fn tokens_name_users_and_their_groups() {
    let auth = auth();
    let bob = auth
        .authenticate(&request(Some("bob-token-0123456789ab")))
        .await
        .expect("bob");
    assert_eq!(bob.name, "bob");
    assert_eq!(bob.uid, "2");
    assert_eq!(bob.groups, ["team-b", "readers", AUTHENTICATED]);
    let anonymous = auth
        .authenticate(&request(None))
        .await
        .expect_err("no token");
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    assert!(anonymous.message().contains("--token-file"));
    let wrong = auth
        .authenticate(&request(Some("alice-token-0123456788")))
        .await
        .expect_err("wrong token");
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
    // An open API takes everyone as anonymous.
    let open = UserAuth::open();
    assert_eq!(
        open.authenticate(&request(None)).await.expect("open").name,
        ANONYMOUS
    );
}

#[tokio::test]
async fn rules_allow_by_verb_resource_and_namespace_and_deny_the_rest() {
    let auth = auth();
    let tokens = TokenFile::parse(TOKENS).expect("tokens");
    let user = |token| tokens.user(token).cloned().expect("user");
    let alice = user("alice-token-0123456789");
    let bob = user("bob-token-0123456789ab");
    let root = user("admin-token-0123456789");
    let policy = Policy::parse(POLICY).expect("policy");
    let allowed = |user: &User, a| policy.allows(user, a);

    assert!(allowed(
        &alice,
        access(Verb::Apply, Resource::Workloads, "team-a")
    ));
    assert!(allowed(
        &alice,
        access(Verb::Get, Resource::WorkloadLogs, "team-a")
    ));
    assert!(!allowed(
        &alice,
        access(Verb::Apply, Resource::Workloads, "team-b")
    ));
    assert!(!allowed(
        &alice,
        access(Verb::Create, Resource::WorkloadAttach, "team-a")
    ));
    assert!(!allowed(
        &alice,
        access(Verb::Get, Resource::Secrets, "team-a")
    ));
    // Across every namespace, or cluster-wide, needs namespaces: ["*"].
    assert!(!allowed(
        &alice,
        access(Verb::List, Resource::Workloads, "")
    ));
    assert!(!allowed(
        &alice,
        access(Verb::Create, Resource::Modules, "")
    ));
    assert!(allowed(&bob, access(Verb::List, Resource::Workloads, "")));
    assert!(allowed(
        &bob,
        access(Verb::Get, Resource::Workloads, "team-a")
    ));
    assert!(!allowed(
        &bob,
        access(Verb::Delete, Resource::Workloads, "team-b")
    ));
    assert!(allowed(&root, access(Verb::Delete, Resource::Nodes, "")));

    // Modules are pushed for a namespace.
    let alice_modules = Policy::parse(
        "rules: [{users: [alice], verbs: [create], resources: [modules], namespaces: [team-a]}]",
    )
    .expect("policy");
    assert!(alice_modules.allows(&alice, access(Verb::Create, Resource::Modules, "team-a")));
    assert!(!alice_modules.allows(&alice, access(Verb::Create, Resource::Modules, "team-b")));
    assert!(!alice_modules.allows(&alice, access(Verb::Create, Resource::Modules, "")));

    let denied = auth
        .authorize(
            &alice,
            Access::new(Verb::Delete, Resource::Secrets, "team-b", "db"),
        )
        .await
        .expect_err("denied");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        denied.message(),
        "user \"alice\" may not delete secrets in namespace \"team-b\": no rule of the policy allows it"
    );
    auth.authorize(&root, access(Verb::Delete, Resource::Secrets, "team-b"))
        .await
        .expect("root may");
}

#[test]
fn bad_files_are_refused_with_the_line_or_rule() {
    assert_eq!(
        TokenFile::parse("short,alice,1").err().map(|e| e.0),
        Some(1)
    );
    assert_eq!(
        TokenFile::parse("# only a comment\n").err().map(|e| e.0),
        Some(0)
    );
    let twice = "alice-token-0123456789,a,1\nalice-token-0123456789,b,2\n";
    assert_eq!(TokenFile::parse(twice).err().map(|e| e.0), Some(2));
    assert_eq!(
        TokenFile::parse("alice-token-0123456789")
            .err()
            .map(|e| e.0),
        Some(1)
    );
    let verb = Policy::parse("rules: [{users: [a], verbs: [steal], resources: [workloads]}]")
        .expect_err("unknown verb");
    assert!(
        verb.contains("rules[0].verbs: unknown verb \"steal\""),
        "{verb}"
    );
    let resource = Policy::parse("rules: [{users: [a], verbs: [get], resources: [pods]}]")
        .expect_err("unknown resource");
    assert!(resource.contains("unknown resource \"pods\""), "{resource}");
    let nobody =
        Policy::parse("rules: [{verbs: [get], resources: [workloads]}]").expect_err("no subject");
    assert!(nobody.contains("name users or groups"), "{nobody}");
}
