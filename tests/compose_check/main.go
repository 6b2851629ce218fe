// Command composecheck loads a compose file with compose-go, the library
// `docker compose` itself uses, and prints the resolved project as JSON.
//
//	go run ./tests/compose_check [-profile NAME]... [-env KEY=VALUE]... compose.yaml
//
// The file is validated against the compose-spec schema and interpolated the
// way `docker compose config` does it: variables come from -env first, then
// the process environment, then a .env file next to the compose file. On an
// invalid file the loader's error goes to stderr and the exit code is 1.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
)

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	var profiles, env multiFlag
	flag.Var(&profiles, "profile", "profile to enable (repeatable)")
	flag.Var(&env, "env", "KEY=VALUE used for interpolation, overriding the environment (repeatable)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(),
			"usage: composecheck [-profile NAME]... [-env KEY=VALUE]... COMPOSE_FILE\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	for _, kv := range env {
		if !strings.Contains(kv, "=") {
			fmt.Fprintf(os.Stderr, "composecheck: -env %q is not KEY=VALUE\n", kv)
			os.Exit(2)
		}
	}

	options, err := cli.NewProjectOptions(
		[]string{flag.Arg(0)},
		// Earlier sources win: -env, then the OS environment, then .env.
		cli.WithEnv(env),
		cli.WithOsEnv,
		cli.WithEnvFiles(),
		cli.WithDotEnv,
		// As `docker compose --profile X config`: COMPOSE_PROFILES if no flag.
		cli.WithDefaultProfiles(profiles...),
		cli.WithResolvedPaths(true),
	)
	if err != nil {
		fail(err)
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		fail(err)
	}
	out, err := project.MarshalJSON()
	if err != nil {
		fail(err)
	}
	os.Stdout.Write(append(out, '\n'))
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "composecheck: %v\n", err)
	os.Exit(1)
}
